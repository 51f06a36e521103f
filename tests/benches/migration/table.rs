//! The cells of the tables: medians per VMM, figures with their units,
//! Ferry/QEMU ratios.

use ferry_tests::bench_net::median;
use ferry_tests::vmms::Vmm;

/// The median of `f` over `vmm`'s runs; NaNs (figures a VMM did not
/// report, or runs that did not complete) are left out.
pub fn med<T>(results: &[(Vmm, T)], vmm: Vmm, f: impl Fn(&T) -> f64) -> f64 {
    median(
        results
            .iter()
            .filter(|(v, _)| *v == vmm)
            .map(|(_, r)| f(r))
            .filter(|x| !x.is_nan())
            .collect(),
    )
}

/// `v` in `unit` ("ms", "B", "count", or "" for a bare number); `-` for
/// NaN.
pub fn fmt(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "-".into();
    }
    match unit {
        "ms" if v < 10.0 => format!("{v:.1} ms"),
        "ms" => format!("{v:.0} ms"),
        "B" if v >= 1e9 => format!("{:.2} GB", v / 1e9),
        "B" if v >= 1e6 => format!("{:.1} MB", v / 1e6),
        "B" => format!("{:.0} kB", v / 1e3),
        "count" if v >= 1e6 => format!("{:.1} M", v / 1e6),
        "count" if v >= 1e3 => format!("{:.1} k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

pub fn ratio(f: f64, q: f64) -> String {
    let r = f / q;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

pub fn size_label(mib: u32) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}
