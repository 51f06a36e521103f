//! `ferry ctl`: a QMP client for people. It connects to a running VM's
//! QMP socket, negotiates, runs one command and prints the result in a
//! readable form (or as JSON for scripts); `events` follows the VM's
//! events instead.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use qmp::client::{ClientError, QmpClient};
use qmp::{QmpEvent, QmpSocketSpec};
use serde_json::{Map, Value};

const ARGUMENT_HELP: &str = "\
Argument syntax:
  key=value    true and false become JSON booleans, JSON numbers become
               numbers, anything else is a string (uri=tcp:10.0.0.2:4444)
  key:=JSON    any JSON value as written: name:='\"42\"', props:='{\"a\": 1}',
               list:='[1, 2]', x:=null

Examples:
  ferry ctl --qmp /run/vm.qmp query-status
  ferry ctl --qmp /run/vm.qmp stop
  ferry ctl --qmp /run/vm.qmp --json query-cpus-fast
  ferry ctl --qmp /run/vm.qmp events
  ferry ctl --qmp /run/vm.qmp migrate tcp:198.18.1.2:4444
  ferry ctl --qmp /run/vm.qmp migrate unix:/run/new.sock backend-transfer=true
  ferry ctl --qmp /run/dst.qmp migrate-incoming tcp:198.18.1.2:4444
  ferry ctl --qmp /run/vm.qmp migrate-set-capabilities \
      capabilities:='[{\"capability\": \"pause-before-switchover\", \"state\": true}]'
  ferry ctl --qmp /run/vm.qmp migrate-continue pre-switchover";

#[derive(Args, Debug)]
#[command(after_help = ARGUMENT_HELP)]
pub struct CtlArgs {
    /// The VM's QMP socket: PATH, or the unix:PATH given to `ferry run --qmp`.
    #[arg(long, value_name = "PATH")]
    pub qmp: String,
    /// Print the result (or each event) as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the reply; 0 waits forever.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// A QMP command (query-status, stop, cont, query-commands, ...), or
    /// `events` to print the VM's events as they happen.
    #[arg(value_name = "COMMAND")]
    pub command: String,
    /// The command's arguments, key=value or key:=JSON.
    #[arg(value_name = "ARG")]
    pub args: Vec<String>,
    /// `migrate`, `migrate-continue`: once the migration has ended, draw
    /// its timeline (passes, dirty rate, throttle, downtime, the
    /// destination's resume and announce) as an SVG picture.
    #[arg(long, value_name = "FILE.svg")]
    pub timeline: Option<PathBuf>,
    /// The same timeline's data, as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub timeline_json: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("timeline: {0}")]
    Timeline(String),
}

pub fn run(args: CtlArgs) -> ExitCode {
    match ctl(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(1)
        }
    }
}

fn ctl(args: CtlArgs) -> Result<(), CtlError> {
    let path = socket_path(&args.qmp)?;
    // `ferry ctl migrate URI`, `migrate-incoming URI`,
    // `migrate-continue STATE`: a bare first argument is that one.
    let bare_key = match args.command.as_str() {
        "migrate" | "migrate-incoming" => Some("uri"),
        "migrate-continue" => Some("state"),
        _ => None,
    };
    let bare =
        bare_key.and_then(|k| Some((k, args.args.first().filter(|a| !a.contains('='))?.clone())));
    let rest = if bare.is_some() {
        &args.args[1..]
    } else {
        &args.args[..]
    };
    let mut arguments = parse_arguments(rest).map_err(CtlError::Usage)?;
    if let Some((key, value)) = bare {
        arguments.insert(key.into(), Value::String(value));
    }
    let timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));

    let mut client = QmpClient::connect_without_negotiation(&path)?;
    client.set_timeout(timeout)?;
    client.negotiate()?;

    match args.command.as_str() {
        "events" => {
            if !arguments.is_empty() {
                return Err(CtlError::Usage("`events` takes no arguments".into()));
            }
            client.set_timeout(None)?;
            watch_events(&mut client, args.json)
        }
        // A migration unfolds over time: start it, then follow it.
        "migrate" if !args.json => {
            if !arguments.contains_key("uri") {
                return Err(CtlError::Usage(
                    "migrate needs a URI: ferry ctl migrate tcp:HOST:PORT".into(),
                ));
            }
            // `backend-transfer=true` on the command line is a migration
            // parameter in QMP: set it first (issue #8's local migration).
            let mut arguments = arguments;
            if let Some(v) = arguments.remove("backend-transfer") {
                let mut p = Map::new();
                p.insert("backend-transfer".into(), v);
                client.execute("migrate-set-parameters", Some(p))?;
            }
            client.execute("migrate", Some(arguments))?;
            follow(&mut client, &args)
        }
        // After a `pre-switchover` stop: continue, and follow to the end.
        "migrate-continue" if !args.json => {
            client.execute("migrate-continue", Some(arguments))?;
            follow(&mut client, &args)
        }
        command => one_shot(&mut client, command, arguments, args.json),
    }
}

/// Follows the migration to its end (or a `pre-switchover` stop), then
/// writes the timeline files asked for; a migration that failed or was
/// cancelled is an error (after its timeline).
fn follow(client: &mut QmpClient, args: &CtlArgs) -> Result<(), CtlError> {
    use crate::progress::Followed;
    match crate::progress::follow_migration(client)? {
        Followed::Completed => draw_timeline(client, args),
        Followed::Paused => {
            if args.timeline.is_some() || args.timeline_json.is_some() {
                eprintln!("ferry: the migration waits in pre-switchover: ask for the timeline with migrate-continue");
            }
            Ok(())
        }
        Followed::Ended => {
            draw_timeline(client, args)?;
            Err(CtlError::Usage("migration did not complete".into()))
        }
    }
}

/// How long to wait for the destination's part of the timeline.
const TIMELINE_WAIT: Duration = Duration::from_secs(6);

/// Writes the timeline files asked for, once the timeline is complete
/// (the destination reported, or the source stopped waiting for it).
fn draw_timeline(client: &mut QmpClient, args: &CtlArgs) -> Result<(), CtlError> {
    if args.timeline.is_none() && args.timeline_json.is_none() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + TIMELINE_WAIT;
    let value = loop {
        let v = client.execute("x-ferry-query-migrate-timeline", None)?;
        if v["complete"].as_bool() == Some(true) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let t: timeline::Timeline =
        serde_json::from_value(value).map_err(|e| CtlError::Timeline(e.to_string()))?;
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text)
            .map_err(|e| CtlError::Timeline(format!("{}: {e}", path.display())))
    };
    if let Some(p) = &args.timeline_json {
        write(p, t.to_json())?;
    }
    if let Some(p) = &args.timeline {
        write(
            p,
            timeline::svg(&t).map_err(|e| CtlError::Timeline(e.to_string()))?,
        )?;
        eprintln!("timeline: {}", p.display());
    }
    Ok(())
}

/// `--qmp` takes a plain path, or the spec `ferry run --qmp` was given so
/// the same string works for both.
fn socket_path(qmp: &str) -> Result<PathBuf, CtlError> {
    if qmp.starts_with("unix:") {
        let spec: QmpSocketSpec = qmp
            .parse()
            .map_err(|e| CtlError::Usage(format!("--qmp {e}")))?;
        Ok(spec.path)
    } else if qmp.is_empty() {
        Err(CtlError::Usage("--qmp: the socket path is empty".into()))
    } else {
        Ok(PathBuf::from(qmp))
    }
}

fn one_shot(
    client: &mut QmpClient,
    command: &str,
    arguments: Map<String, Value>,
    json: bool,
) -> Result<(), CtlError> {
    let arguments = (!arguments.is_empty()).then_some(arguments);
    let result = client.execute(command, arguments)?;
    if json {
        println!("{result}");
    } else {
        print!("{}", render(&result));
    }
    Ok(())
}

fn watch_events(client: &mut QmpClient, json: bool) -> Result<(), CtlError> {
    loop {
        let event = match client.next_event() {
            Ok(e) => e,
            // The VM went away (quit, power-off): nothing more will come.
            Err(ClientError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if json {
            match serde_json::to_string(&event) {
                Ok(line) => println!("{line}"),
                Err(e) => return Err(CtlError::Usage(format!("event: {e}"))),
            }
        } else {
            print!("{}", render_event(&event));
        }
    }
}

/// `key=value` and `key:=JSON` into a QMP arguments object.
fn parse_arguments(args: &[String]) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for arg in args {
        let Some((key, text)) = arg.split_once('=') else {
            return Err(format!("argument {arg:?}: expected key=value or key:=JSON"));
        };
        let (key, value) = match key.strip_suffix(':') {
            Some(key) => {
                let value = serde_json::from_str(text)
                    .map_err(|e| format!("argument {key:?}: {text:?} is not JSON: {e}"))?;
                (key, value)
            }
            None => (key, infer(text)),
        };
        if key.is_empty() {
            return Err(format!("argument {arg:?}: the name before = is empty"));
        }
        if map.insert(key.to_string(), value).is_some() {
            return Err(format!("argument {key:?} is given twice"));
        }
    }
    Ok(map)
}

/// A bare value: a boolean or a number if it reads as one, else a string.
fn infer(text: &str) -> Value {
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => match serde_json::from_str::<Value>(text) {
            Ok(n @ Value::Number(_)) => n,
            _ => Value::String(text.to_string()),
        },
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Object(_) | Value::Array(_))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value in one table cell: flat objects as `k=v`, flat lists joined.
fn cell(v: &Value) -> String {
    match v {
        Value::Object(m) if m.values().all(is_scalar) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(a) if a.iter().all(is_scalar) => {
            a.iter().map(scalar).collect::<Vec<_>>().join(",")
        }
        other if is_scalar(other) => scalar(other),
        other => other.to_string(),
    }
}

/// A command's result for people: objects as `key: value` lines, nested
/// ones indented, lists of records as tables, other lists as bullets. An
/// empty object (what most commands return) prints nothing.
fn render(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if m.is_empty() => {}
        Value::Array(a) if a.is_empty() => out.push_str("(none)\n"),
        _ => render_into(&mut out, v, 0),
    }
    out
}

fn render_into(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::Object(inner) if inner.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}: {{}}");
                    }
                    Value::Array(a) if a.is_empty() => {
                        let _ = writeln!(out, "{pad}{k}: (none)");
                    }
                    _ if is_scalar(v) => {
                        let _ = writeln!(out, "{pad}{k}: {}", scalar(v));
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}{k}:");
                        render_into(out, v, indent + 2);
                    }
                }
            }
        }
        Value::Array(a) if is_table(a) => render_table(out, a, indent),
        Value::Array(a) => {
            for item in a {
                if is_scalar(item) {
                    let _ = writeln!(out, "{pad}- {}", scalar(item));
                } else {
                    // The first line of the item goes after the bullet.
                    let mut inner = String::new();
                    render_into(&mut inner, item, indent + 2);
                    let body = inner.get(indent + 2..).unwrap_or("");
                    let _ = write!(out, "{pad}- {body}");
                }
            }
        }
        scalar_value => {
            let _ = writeln!(out, "{pad}{}", scalar(scalar_value));
        }
    }
}

/// Records whose fields fit in cells.
fn is_table(a: &[Value]) -> bool {
    !a.is_empty()
        && a.iter().all(|item| match item {
            Value::Object(m) => m.values().all(|v| {
                is_scalar(v)
                    || matches!(v, Value::Object(inner) if inner.values().all(is_scalar))
                    || matches!(v, Value::Array(inner) if inner.iter().all(is_scalar))
            }),
            _ => false,
        })
}

fn render_table(out: &mut String, rows: &[Value], indent: usize) {
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        if let Value::Object(m) = row {
            for k in m.keys() {
                if !columns.contains(&k.as_str()) {
                    columns.push(k);
                }
            }
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| row.get(*c).map(cell).unwrap_or_else(|| "-".into()))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |out: &mut String, fields: &[&str]| {
        let mut text = " ".repeat(indent);
        for (i, f) in fields.iter().enumerate() {
            if i + 1 == fields.len() {
                text.push_str(f);
            } else {
                let _ = write!(text, "{f:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(out, &columns);
    for row in &cells {
        let fields: Vec<&str> = row.iter().map(String::as_str).collect();
        line(out, &fields);
    }
}

/// `2025-01-31 12:00:00.123456 UTC  STOP`, flat data on the same line,
/// nested data indented below.
fn render_event(event: &QmpEvent) -> String {
    let mut out = format!(
        "{}  {}",
        format_timestamp(event.timestamp.seconds, event.timestamp.microseconds),
        event.event
    );
    match &event.data {
        None => out.push('\n'),
        Some(Value::Object(m)) if m.is_empty() => out.push('\n'),
        Some(Value::Object(m)) if m.values().all(is_scalar) => {
            for (k, v) in m {
                let _ = write!(out, " {k}={}", scalar(v));
            }
            out.push('\n');
        }
        Some(data) => {
            out.push('\n');
            render_into(&mut out, data, 2);
        }
    }
    out
}

/// UTC wall-clock time from QMP's timestamp (-1/-1 when the server could
/// not read its clock).
fn format_timestamp(seconds: i64, micros: i64) -> String {
    if seconds < 0 {
        return "(no time)".into();
    }
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06} UTC",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        micros.clamp(0, 999_999)
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01, by shifting
/// the year to start in March so the leap day falls at its end.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(list: &[&str]) -> Result<Value, String> {
        let owned: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        parse_arguments(&owned).map(Value::Object)
    }

    #[test]
    fn key_value_arguments() {
        assert_eq!(
            args(&[
                "uri=tcp:10.0.0.2:4444",
                "n=3",
                "x=-1.5",
                "on=true",
                "off=false"
            ])
            .unwrap(),
            json!({"uri": "tcp:10.0.0.2:4444", "n": 3, "x": -1.5, "on": true, "off": false})
        );
        assert_eq!(
            args(&["s=007", "t=null", "u=", "v=a=b"]).unwrap(),
            json!({"s": "007", "t": "null", "u": "", "v": "a=b"})
        );
        assert_eq!(
            args(&[r#"id:="42""#, r#"o:={"a": [1]}"#, "z:=null"]).unwrap(),
            json!({"id": "42", "o": {"a": [1]}, "z": null})
        );
        assert!(args(&["novalue"]).unwrap_err().contains("key=value"));
        assert!(args(&["=1"]).unwrap_err().contains("empty"));
        assert!(args(&["a=1", "a=2"]).unwrap_err().contains("twice"));
        assert!(args(&["a:={"]).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn qmp_spellings_of_the_socket() {
        assert_eq!(socket_path("/run/q").unwrap(), PathBuf::from("/run/q"));
        assert_eq!(
            socket_path("unix:/run/q,server=on,wait=off").unwrap(),
            PathBuf::from("/run/q")
        );
        assert!(socket_path("unix:").is_err());
        assert!(socket_path("").is_err());
    }

    #[test]
    fn objects_print_as_key_lines() {
        assert_eq!(render(&json!({})), "");
        assert_eq!(
            render(&json!({"status": "running", "running": true})),
            "running: true\nstatus: running\n"
        );
        assert_eq!(
            render(&json!({"ram": {"total": 1024, "remaining": 0}, "status": "completed"})),
            "ram:\n  remaining: 0\n  total: 1024\nstatus: completed\n"
        );
        assert_eq!(render(&json!("text")), "text\n");
        assert_eq!(render(&json!([])), "(none)\n");
    }

    #[test]
    fn records_print_as_tables() {
        let cpus = json!([
            {"cpu-index": 0, "thread-id": 4242, "props": {"core-id": 0, "socket-id": 0}},
            {"cpu-index": 1, "thread-id": 4243, "props": {"core-id": 1, "socket-id": 0}},
        ]);
        assert_eq!(
            render(&cpus),
            "cpu-index  props                  thread-id\n\
             0          core-id=0 socket-id=0  4242\n\
             1          core-id=1 socket-id=0  4243\n"
        );
        let ragged = json!([{"name": "a"}, {"name": "bb", "extra": true}]);
        assert_eq!(render(&ragged), "name  extra\na     -\nbb    true\n");
    }

    #[test]
    fn other_lists_print_as_bullets() {
        assert_eq!(render(&json!(["a", 1])), "- a\n- 1\n");
        let deep = json!({"devs": [{"id": "n0", "q": {"r": {"s": 1}}}]});
        assert_eq!(
            render(&deep),
            "devs:\n  - id: n0\n    q:\n      r:\n        s: 1\n"
        );
    }

    #[test]
    fn events_print_on_one_line_when_flat() {
        let e = QmpEvent {
            event: "SHUTDOWN".into(),
            data: Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            timestamp: qmp::Timestamp {
                seconds: 1_258_551_470,
                microseconds: 802_384,
            },
        };
        assert_eq!(
            render_event(&e),
            "2009-11-18 13:37:50.802384 UTC  SHUTDOWN guest=false reason=host-qmp-quit\n"
        );
        let stop = QmpEvent {
            event: "STOP".into(),
            data: None,
            ..e
        };
        assert_eq!(
            render_event(&stop),
            "2009-11-18 13:37:50.802384 UTC  STOP\n"
        );
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(format_timestamp(-1, -1), "(no time)");
    }
}
