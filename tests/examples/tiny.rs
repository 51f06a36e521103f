fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ending = match args.get(1).map(String::as_str) {
        Some("reset") => ferry_tests::tiny::Ending::AcpiReset,
        Some("kbd") => ferry_tests::tiny::Ending::I8042Reset,
        Some("triple") => ferry_tests::tiny::Ending::TripleFault,
        Some("popcnt") => ferry_tests::tiny::Ending::Popcnt,
        _ => ferry_tests::tiny::Ending::AcpiPowerOff,
    };
    let p = ferry_tests::tiny::write_guest("demo", b"Hello from a tiny guest\n", ending);
    println!("{}", p.display());
}
