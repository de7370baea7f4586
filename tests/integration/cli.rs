//! The binary as an operator runs it.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

fn edgeferry(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("runs")
}

/// `edgeferry check -c <config>` in `d`, which must exit with `code`: its stderr.
fn check_fails(d: &Path, config: &str, code: i32) -> String {
    let out = edgeferry(&["check", "-c", config], d);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    stderr
}

/// `edgeferry.toml` in `d`: one upstream, no metrics, the rules in `d/rules`.
fn write_small_config(d: &Path) {
    write(
        &d.join("edgeferry.toml"),
        &format!(
            "[broker]\nlisten = \"127.0.0.1:{}\"\n[metrics]\nenabled = false\n[queue]\npath = \"q.db\"\n[upstream.cloud]\nurl = \"mqtt://127.0.0.1:1884\"\n",
            free_port()
        ),
    );
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn check_reports_every_error_with_file_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("rules/a.toml"),
        "[[rule]]\nname = \"x\"\nmatch = \"a/#/b\"\nto = [{ upstream = \"cloud\" }]\n",
    );
    write(
        &d.join("rules/b.toml"),
        "[[rule]]\nname = \"y\"\nmatch = \"b\"\nto = [{ upstream = \"nowhere\" }]\n",
    );
    write(
        &d.join("edgeferry.toml"),
        "[upstream.cloud]\nurl = \"mqtt://127.0.0.1:1884\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("rules/a.toml:3:9:") && stderr.contains("'#' is only allowed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rules/b.toml:4:20:") && stderr.contains("\"nowhere\" is not configured"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
    // The README shows exactly this run.
    assert_eq!(
        stderr,
        doc_block("README.md", "A broken pattern and an unknown upstream")
    );
}

/// The fenced block after `marker` in `doc` (a file of the repository),
/// or the one `marker` is in.
fn doc_block(doc: &str, marker: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).unwrap();
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{doc}: {marker:?}"));
    let inside = text[..at].matches("```").count() % 2 == 1;
    let after = match inside {
        true => &text[text[..at].rfind("```").unwrap()..],
        false => &text[at..],
    };
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// The README's first rule is a rule that loads and whose test passes.
#[test]
fn the_readmes_first_rule_checks_and_passes_its_test() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("rules/first.toml"),
        &doc_block("README.md", "## A first rule"),
    );
    write_small_config(d);
    let out = edgeferry(&["-c", "edgeferry.toml", "check"], d);
    assert!(out.status.success(), "{out:?}");
    let out = edgeferry(&["-c", "edgeferry.toml", "test"], d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("1 passed, 0 failed\n"),
        "{stdout}"
    );
}

/// The README's "Commands from the cloud" config and rule: the config
/// checks with the rule, and the rule's test passes.
#[test]
fn the_readmes_command_example_checks_and_passes_its_test() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("edgeferry.toml"),
        &doc_block("README.md", "# /etc/edgeferry/edgeferry.toml"),
    );
    write(
        &d.join("rules/40-commands.toml"),
        &doc_block("README.md", "# /etc/edgeferry/rules/40-commands.toml"),
    );
    let out = edgeferry(&["-c", "edgeferry.toml", "check"], d);
    assert!(out.status.success(), "{out:?}");
    let out = edgeferry(&["-c", "edgeferry.toml", "test"], d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("1 passed, 0 failed\n"),
        "{stdout}"
    );
}

/// `check` on the downlink keys and `from`: file:line for each, in one run.
#[test]
fn check_names_bad_downlink_keys_and_unknown_from_upstreams_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("rules/c.toml"),
        "[[rule]]\nname = \"c\"\nfrom = \"clud\"\nmatch = \"gw/#\"\nto = [{ local = \"x\", qos = 1 }]\n",
    );
    write(
        &d.join("edgeferry.toml"),
        "[gateway]\nid = \"g1\"\n[metrics]\nenabled = false\n[upstream.cloud]\nurl = \"mqtt://h\"\nsubscribe = [\"gw/{gateway}/cmd/#/x\"]\ncontrol_topic = \"gw/+/control\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines[0].starts_with(
            "edgeferry.toml:7:1: upstream.cloud.subscribe entry 1 (\"gw/{gateway}/cmd/#/x\")"
        ),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("edgeferry.toml:8:1: upstream.cloud.control_topic"),
        "{stderr}"
    );
    assert!(
        lines[2].ends_with("c.toml:3:8: rule \"c\": from \"clud\" is neither \"local\" nor a configured upstream (configured: cloud); a downlink rule names the [upstream.<name>] it subscribes on"),
        "{stderr}"
    );
}

/// docs/rules.md's `edgeferry test` example is what the example rules
/// print with the expectation it names broken: every line it shows.
#[test]
fn the_documented_test_output_is_what_edgeferry_test_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in edgeferry::rules::toml_files(&repo.join("rules")).unwrap() {
        let f = f.file_name().unwrap().to_str().unwrap().to_string();
        let mut text = std::fs::read_to_string(repo.join("rules").join(&f)).unwrap();
        if f == "10-sensors.toml" {
            let at = "{ at = \"2m\", topic = \"sensors/barn/h1/humidity\", payload = { value = 57.9 }, expect = [{ upstream = \"cloud\", payload = { value = 57.9 } }] }";
            assert!(text.contains(at), "the broken step is still there");
            text = text.replace(
                at,
                &at.replacen("{ value = 57.9 } }]", "{ value = 57.0 } }]", 1),
            );
        }
        write(&d.join("rules").join(f), &text);
    }
    for f in std::fs::read_dir(repo.join("rules")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|x| x == "json") {
            std::fs::copy(&f, d.join("rules").join(f.file_name().unwrap())).unwrap();
        }
    }
    write_small_config(d);
    let out = edgeferry(&["test", "-c", "edgeferry.toml"], d);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shown = doc_block("docs/rules.md", "after breaking one expectation on purpose");
    let mut lines = stdout.lines();
    for want in shown.lines().skip(1).filter(|l| *l != "...") {
        assert!(
            lines.any(|l| l == want),
            "{want:?} not in order in:\n{stdout}"
        );
    }
}

#[test]
fn check_reports_a_broken_config_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("rules/ok.toml"), "");
    write(
        &d.join("edgeferry.toml"),
        "[queue]\ncommit_interval = \"fast\"\n\n[upstream.cloud]\nurl = \"mqtt://h\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("edgeferry.toml:2:19:") && stderr.contains("invalid duration \"fast\""),
        "{stderr}"
    );

    write(
        &d.join("edgeferry.toml"),
        "[broker]\nlisten = \"127.0.0.1:1883\"\nlisen_v5 = \"x\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("edgeferry.toml:3:1:") && stderr.contains("lisen_v5"),
        "{stderr}"
    );
}

/// `-c` before the command as after it; a command line that cannot be
/// parsed exits 64 (EX_USAGE), never 2, which means a bad config.
#[test]
fn the_config_goes_before_or_after_the_command_and_usage_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("rules/ok.toml"), "");
    write_small_config(d);
    for args in [
        &["-c", "edgeferry.toml", "check"][..],
        &["check", "-c", "edgeferry.toml"],
        &["--config", "edgeferry.toml", "check"],
    ] {
        let out = edgeferry(args, d);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            stdout.starts_with("edgeferry.toml: ok"),
            "{args:?}: {stdout}"
        );
    }
    for args in [
        &["frobnicate"][..],
        &["check", "--frob"],
        &["-c"],
        &["queue", "stats", "--db", "q.db", "-c", "edgeferry.toml"],
        &["-c", "edgeferry.toml", "queue", "export", "--db", "q.db"],
        &["completions", "tcsh"],
    ] {
        let out = edgeferry(args, d);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error:"),
            "{args:?}"
        );
    }
    for args in [&["--help"][..], &["--version"], &["help", "queue"]] {
        assert!(edgeferry(args, d).status.success(), "{args:?}");
    }
}

/// Completions and man pages come from the clap definitions, so they name
/// every command and option there is.
#[test]
fn completions_and_man_pages_are_generated_from_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (shell, marker) in [
        ("bash", "_edgeferry()"),
        ("zsh", "#compdef edgeferry"),
        ("fish", "complete -c edgeferry"),
    ] {
        let out = edgeferry(&["completions", shell], d);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && script.contains(marker),
            "{shell}: {script}"
        );
        for word in ["print-default-config", "export", "config"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
    let out = edgeferry(&["man", "--out", "man"], d);
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(d.join("man/edgeferry.1")).unwrap();
    assert!(
        page.starts_with(".ie") && page.contains(".SH \"EXIT STATUS\""),
        "{page}"
    );
    assert!(
        page.contains("\\fB64\\fR") && page.contains("edgeferry\\-queue(1)"),
        "{page}"
    );
    for sub in [
        "run",
        "check",
        "test",
        "status",
        "passwd",
        "queue-stats",
        "queue-export",
    ] {
        assert!(d.join(format!("man/edgeferry-{sub}.1")).is_file(), "{sub}");
    }
    let stdout = edgeferry(&["man"], d).stdout;
    assert_eq!(
        stdout,
        page.as_bytes(),
        "the printed page is the written one"
    );
}

#[test]
fn the_printed_default_config_loads_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = edgeferry(&["print-default-config"], d);
    assert!(out.status.success());
    write(
        &d.join("edgeferry.toml"),
        &String::from_utf8(out.stdout).unwrap(),
    );
    std::fs::create_dir(d.join("rules")).unwrap();
    for f in std::fs::read_dir(repo_rules()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join("rules").join(f.file_name().unwrap())).unwrap();
    }
    let out = edgeferry(&["check", "-c", "edgeferry.toml"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the embedded default itself, from the repo root (rules in ./rules).
    let out = edgeferry(&["check"], Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_on_a_port_in_use_exits_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = listen_on(&config_text(d, free_port(), ""), port);
    write(&d.join("edgeferry.toml"), &text);
    let out = edgeferry(&["run", "-c", "edgeferry.toml"], d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port}: address already in use"
        )),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_the_daemon_cleanly_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let text = listen_on(&config_text(d, free_port(), ""), port);
    write(&d.join("edgeferry.toml"), &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Started once its broker accepts connections.
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < DEADLINE, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_at = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped_at.elapsed() < DEADLINE, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("edgeferry stopped"), "{stderr}");
}

/// Issue 17: two daemons on one queue file (other ports, same
/// `queue.path`) both sent from it. The second is now refused before it
/// opens anything, names the holder, and exits 4; the first keeps routing
/// and `queue stats` still reads the file beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_queue_is_refused_and_the_first_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(&d, proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    sensor
        .publish("sensors/a/t/temperature", reading("t", 1))
        .await;
    wait_until("queued", || gw.queued("cloud") == 1).await;

    // Same queue.path, every port its own.
    let second = d.join("second.toml");
    write(&second, &config_text(&d, proxy.port, ""));
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", second.to_str().unwrap()])
        .current_dir(&d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the second daemon kept running on the same queue");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(4), "{stderr}");
    let db = d.join("queue.db");
    assert!(
        stderr.contains(&format!(
            "queue {} is in use by pid {}",
            db.display(),
            std::process::id()
        )),
        "{stderr}"
    );

    sensor
        .publish("sensors/a/t/temperature", reading("t", 2))
        .await;
    wait_until("the first still queues", || gw.queued("cloud") == 2).await;
    let out = edgeferry(&["queue", "stats", "--db", db.to_str().unwrap()], &d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cloud"));
    gw.stop().await;

    // Stopped: the file is free again.
    let gw = Gateway::start(&d, proxy.port).await;
    assert_eq!(gw.queued("cloud"), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_stats_and_export_read_the_queue_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(&d, proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..5 {
        sensor
            .publish("sensors/a/t/temperature", reading("t", seq))
            .await;
    }
    sensor.publish("alarms/a/door", reading("door", 9)).await;
    sensor
        .publish("devices/pump/telemetry", vec![0xff, 0x00, 0x01])
        .await;
    wait_until("queued", || gw.queued("cloud") == 7).await;

    let db = d.join("queue.db");
    let db_arg = db.to_str().unwrap();
    let out = edgeferry(&["queue", "stats", "--db", db_arg], &d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["cloud", "high", "1"], "{stdout}");
    assert_eq!(lines[1][..3], ["cloud", "normal", "6"], "{stdout}");

    let out = edgeferry(
        &["queue", "export", "--db", db_arg, "--upstream", "cloud"],
        &d,
    );
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 7);
    assert_eq!(events[0]["topic"], "plant/a/door/alarm");
    assert_eq!(events[0]["priority"], "high");
    assert!(events[0]["expires_ms"].as_u64().is_some());
    assert_eq!(
        events[1]["payload"],
        String::from_utf8(reading("t", 0)).unwrap()
    );
    assert_eq!(events[6]["payload_hex"], "ff0001");
    let out = edgeferry(
        &["queue", "export", "--db", db_arg, "--upstream", "other"],
        &d,
    );
    assert!(out.status.success() && out.stdout.is_empty());
    gw.stop().await;

    let out = edgeferry(
        &[
            "queue",
            "stats",
            "--db",
            d.join("nope.db").to_str().unwrap(),
        ],
        &d,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no queue at"));
}

#[test]
fn test_runs_the_cases_in_rule_files_and_shows_a_diff_on_failure() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The example rules pass their own tests.
    let out = edgeferry(&["test"], repo);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let cases = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(cases >= 10, "{stdout}");
    assert!(
        stdout.contains(&format!("{cases} passed, 0 failed")),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("t.toml"),
        r#"[[rule]]
name = "r"
match = "s/{d}"
to = [{ upstream = "cloud", topic = "x/{d}" }]

[[test]]
name = "right"
input = { topic = "s/a", payload = { v = 1 } }
expect = [{ upstream = "cloud", topic = "x/a", payload = { v = 1 } }]

[[test]]
name = "wrong"
input = { topic = "s/a", payload = { v = 1 } }
expect = [{ upstream = "cloud", topic = "y/a" }]
"#,
    );
    let out = edgeferry(&["test", "t.toml"], d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ok      t.toml:6: right"), "{stdout}");
    assert!(stdout.contains("FAILED  t.toml:11: wrong"), "{stdout}");
    assert!(stdout.contains("different topic"), "{stdout}");
    assert!(
        stdout.contains("expected: upstream \"cloud\" topic \"y/a\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("got:      upstream \"cloud\" topic \"x/a\""),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");

    // Invalid rules: exit 2 with file:line; a path that is not there: exit 3.
    write(
        &d.join("bad.toml"),
        "[[rule]]\nname = \"b\"\nmatch = \"a\"\nwhen = \"1 +\"\ndrop = true\n",
    );
    let out = edgeferry(&["test", "bad.toml"], d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml:4:"), "{stderr}");
    assert!(stderr.contains("CEL syntax error"), "{stderr}");
    let out = edgeferry(&["test", "nowhere.toml"], d);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn check_tells_an_unreadable_file_from_an_invalid_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stderr = check_fails(d, "missing.toml", 3);
    assert!(
        stderr.contains("missing.toml: cannot read config"),
        "{stderr}"
    );
    write(
        &d.join("edgeferry.toml"),
        "[rules]\ndir = \"no-such-dir\"\n\n[upstream.cloud]\nurl = \"mqtt://h\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 3);
    assert!(stderr.contains("cannot read rules directory"), "{stderr}");
    // Every file a config names: unreadable is exit 3, at its key.
    write(&d.join("rules/ok.toml"), "");
    for (table, lines, key) in [
        (
            "broker",
            "password_file = \"no-passwd\"",
            "broker.password_file",
        ),
        ("broker", "acl_file = \"no-acl\"", "no-acl"),
        (
            "broker",
            "tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"no.pem\"\ntls_key = \"no.key\"",
            "broker.tls_cert",
        ),
        (
            "upstream.cloud",
            "url = \"mqtts://h\"\nca_file = \"no-ca.pem\"",
            "no-ca.pem",
        ),
        (
            "upstream.cloud",
            "url = \"mqtt://h\"\nusername = \"u\"\npassword_file = \"no-pw\"",
            "no-pw",
        ),
    ] {
        let cloud = match table {
            "broker" => "\n[upstream.cloud]\nurl = \"mqtt://h\"\n",
            _ => "",
        };
        write(
            &d.join("edgeferry.toml"),
            &format!("[rules]\ndir = \"rules\"\n[{table}]\n{lines}\n{cloud}"),
        );
        let stderr = check_fails(d, "edgeferry.toml", 3);
        assert!(
            stderr.contains(key) && stderr.contains("cannot read"),
            "{key}: {stderr}"
        );
    }
}

/// Hostile-run finding, issue 17: `check` showed one config error per run.
/// Four independent ones (a wrong type, an unknown key, a bad duration, a
/// socket address that is a host name), plus one the checks find after
/// parsing: all five, in line order, in one run, and the socket address
/// error shows the form expected.
#[test]
fn check_reports_every_config_error_at_once_in_line_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("rules/ok.toml"), "");
    write(
        &d.join("edgeferry.toml"),
        "[broker]\n\
         max_connections = \"many\"\n\
         bogus = true\n\
         \n\
         [queue]\n\
         path = \"q.db\"\n\
         commit_interval = \"10 parsecs\"\n\
         \n\
         [metrics]\n\
         listen = \"localhost:9184\"\n\
         \n\
         [upstream.cloud]\n\
         url = \"mqtt://127.0.0.1:1884\"\n\
         inflight = 0\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        ("edgeferry.toml:2:", "expected usize"),
        ("edgeferry.toml:3:", "unknown field `bogus`"),
        ("edgeferry.toml:7:", "invalid duration \"10 parsecs\""),
        (
            "edgeferry.toml:10:",
            "invalid socket address \"localhost:9184\": the host must be an IP address, not a name, e.g. \"127.0.0.1:9184\"",
        ),
        ("edgeferry.toml:14:", "inflight must be at least 1"),
    ];
    assert_eq!(lines.len(), expected.len() + 1, "{stderr}");
    for (line, (at, what)) in lines.iter().zip(expected) {
        assert!(
            line.contains(at) && line.contains(what),
            "{at} {what}: {stderr}"
        );
    }
    assert_eq!(lines[expected.len()], "5 error(s)");

    // What follows from a default standing in for a rejected value is not
    // reported as a mistake of its own: that tls_cert needs tls_listen
    // (whose value was refused), or that a rule routes to an upstream
    // whose table had to go.
    let only = |config: &str, want: &[(&str, &str)]| {
        write(&d.join("edgeferry.toml"), config);
        let stderr = check_fails(d, "edgeferry.toml", 2);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), want.len() + 1, "{stderr}");
        for (line, (at, what)) in lines.iter().zip(want) {
            assert!(
                line.starts_with(at) && line.contains(what),
                "{at} {what}: {stderr}"
            );
        }
    };
    only(
        "[broker]\ntls_listen = \"localhost:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\n[upstream.cloud]\nurl = \"mqtt://h\"\n",
        &[("edgeferry.toml:2:", "not a name")],
    );
    write(
        &d.join("rules/to-cloud.toml"),
        "[[rule]]\nname = \"r\"\nmatch = \"a/#\"\nto = [{ upstream = \"cloud\" }]\n",
    );
    only(
        "[upstream.cloud]\nbogus = 1\n",
        &[
            ("edgeferry.toml:1:", "missing field `url`"),
            ("edgeferry.toml:2:", "unknown field `bogus`"),
            ("./rules: ", "rules not checked"),
        ],
    );
    // But an unknown key hides nothing (no default stands in for it), and
    // a refused value hides neither the other tables' checks nor that the
    // rules went unchecked.
    only(
        "[broker]\nbogus = 1\nmax_connections = 0\n[upstream.cloud]\nurl = \"mqtt://h\"\n",
        &[
            ("edgeferry.toml:2:", "unknown field `bogus`"),
            ("edgeferry.toml:3:", "max_connections"),
        ],
    );
    only(
        "[broker]\nmax_connections = 0\n[upstream.cloud]\nurl = 5\n",
        &[
            ("edgeferry.toml:2:", "max_connections"),
            ("edgeferry.toml:4:", "invalid type"),
            ("./rules: ", "rules not checked"),
        ],
    );
}

#[test]
fn sighup_reloads_the_rules_of_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    let rule = |name: &str| {
        format!("[[rule]]\nname = \"{name}\"\nmatch = \"s/#\"\nto = [{{ upstream = \"cloud\" }}]\n")
    };
    write(&rules.join("r.toml"), &rule("first"));
    let port = free_port();
    // File watching off: only the signal can reload.
    let text = rules_at(
        &listen_on(&config_text(d, free_port(), ""), port),
        &rules,
        "watch = false",
    );
    write(&d.join("edgeferry.toml"), &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let wait_log = |what: &str| {
        let start = Instant::now();
        while !log.lock().unwrap().contains(what) {
            assert!(
                start.elapsed() < DEADLINE,
                "no {what:?} in:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log("edgeferry started");
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
    };
    write(&rules.join("r.toml"), &rule("second"));
    hup();
    wait_log("added=1: second removed=1: first");
    // A broken edit is refused and the daemon keeps running.
    write(&rules.join("r.toml"), "[[rule]]\nname = \"x\"\n");
    hup();
    wait_log("rules NOT reloaded");
    assert!(
        log.lock().unwrap().contains("r.toml:1:1:"),
        "{}",
        log.lock().unwrap()
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "{}", log.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_running_daemon_and_falls_back_to_the_queue_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (port, metrics_port) = (free_port(), free_port());
    // The upstream never answers: events stay queued.
    let text = metrics_on(
        &listen_on(&config_text(&d, free_port(), ""), port),
        metrics_port,
    );
    write(&d.join("edgeferry.toml"), &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(&d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let start = Instant::now();
    while std::net::TcpStream::connect(metrics).is_err() {
        assert!(start.elapsed() < DEADLINE, "daemon did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sensor = Sensor::connect(([127, 0, 0, 1], port).into()).await;
    for seq in 0..3 {
        sensor
            .publish("sensors/a/t/temperature", reading("t", seq))
            .await;
    }
    sensor.wait_acked(3).await;
    wait_until("queued", || queued_in(&d.join("queue.db"), "cloud") == 3).await;

    let out = edgeferry(&["status", "-c", "edgeferry.toml"], &d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("edgeferry on test: running for"),
        "{stdout}"
    );
    assert!(stdout.contains("healthy"), "{stdout}");
    assert!(
        stdout.contains("rules:  13 loaded, never reloaded"),
        "{stdout}"
    );
    let cloud: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("cloud "))
        .unwrap_or_else(|| panic!("{stdout}"))
        .split_whitespace()
        .collect();
    // Nothing listens upstream: down, and why.
    assert_eq!(
        &cloud[..4],
        ["cloud", "DOWN", "(unreachable)", "3"],
        "{stdout}"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = edgeferry(&["status", "-c", "edgeferry.toml"], &d);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("edgeferry is not running (nothing answers on"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["cloud", "normal", "3"])),
        "{stdout}"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line_under_journald_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = listen_on(
        &config_text(d, free_port(), "[log]\nformat = \"json\"\n"),
        port,
    );
    write(&d.join("edgeferry.toml"), &text);
    for journal in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeferry"));
        cmd.args(["-c", "edgeferry.toml"]).current_dir(d);
        if journal {
            cmd.env("JOURNAL_STREAM", "8:12345");
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let objects: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| {
                let l = match journal {
                    true => l
                        .strip_prefix("<6>")
                        .or(l.strip_prefix("<3>"))
                        .or(l.strip_prefix("<4>"))
                        .unwrap_or_else(|| panic!("no priority: {l}")),
                    false => l,
                };
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
            })
            .collect();
        let opened = objects
            .iter()
            .find(|o| o["fields"]["message"] == "queue opened")
            .expect("queue opened");
        assert_eq!(opened["level"], "INFO");
        assert!(
            opened["timestamp"]
                .as_str()
                .is_some_and(|t| t.starts_with("20")),
            "{opened}"
        );
        assert!(
            opened["fields"]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("queue.db")),
            "{opened}"
        );
        assert!(
            objects
                .iter()
                .any(|o| o["level"] == "ERROR" && o.to_string().contains("address already in use")),
            "{stderr}"
        );
    }
}

#[test]
fn under_journald_log_lines_carry_their_priority_and_no_time_or_colour() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    write(
        &d.join("edgeferry.toml"),
        &listen_on(&config_text(d, free_port(), ""), port),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["run", "-c", "edgeferry.toml"])
        .current_dir(d)
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let logged: Vec<&str> = stderr.lines().filter(|l| l.starts_with('<')).collect();
    assert!(
        logged
            .iter()
            .any(|l| l.starts_with("<6> INFO queue opened")),
        "{stderr}"
    );
    assert!(
        logged
            .iter()
            .any(|l| l.starts_with("<3>ERROR") && l.contains("address already in use")),
        "{stderr}"
    );
    assert!(
        stderr.lines().all(|l| l.starts_with('<')),
        "every line has a priority: {stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "no colour codes: {stderr}");
    assert!(
        !stderr.contains("2026-") && !stderr.contains("Z "),
        "no timestamps: {stderr}"
    );
}

#[test]
fn check_names_unusable_certificates_keys_and_password_files_at_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("rules/ok.toml"), "");
    let ca = crate::pki::Ca::new("test CA");
    ca.write(d, "ca");
    ca.issue(d, "expired", &["gw"], true);
    ca.issue(d, "client", &["gw"], false);
    ca.issue(d, "other", &["gw"], false);
    let config = |cloud: &str| {
        write(
            &d.join("edgeferry.toml"),
            &format!(
                "[upstream.local]\nurl = \"mqtt://127.0.0.1:1884\"\n\n[upstream.cloud]\nurl = \"mqtts://localhost\"\n{cloud}\n"
            ),
        )
    };
    // Exit 3 for a file that cannot be read, 2 for one that is wrong.
    let expect = |cloud: &str, line: usize, words: &[&str]| {
        config(cloud);
        let unreadable = words.iter().any(|w| w.contains("cannot read"));
        let code = if unreadable { 3 } else { 2 };
        let stderr = check_fails(d, "edgeferry.toml", code);
        assert!(
            stderr.contains(&format!("edgeferry.toml:{line}:1:")),
            "line {line}: {stderr}"
        );
        for w in words {
            assert!(stderr.contains(w), "{w:?}: {stderr}");
        }
    };
    expect(
        "ca_file = \"ca.pem\"\ncert_file = \"expired.pem\"\nkey_file = \"expired.key\"",
        7,
        &["expired.pem", "expired on"],
    );
    expect(
        "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"other.key\"",
        8,
        &["other.key", "does not go with", "client.pem"],
    );
    expect(
        "ca_file = \"missing.pem\"",
        6,
        &["missing.pem", "cannot read"],
    );
    expect(
        "ca_file = \"client.key\"",
        6,
        &["client.key", "contains no certificate"],
    );
    expect(
        "cert_file = \"client.pem\"",
        6,
        &["needs both cert_file and key_file"],
    );
    expect(
        "username = \"gw\"\npassword = \"x\"\npassword_file = \"pw\"",
        7,
        // (and the file it names is missing too)
        &[
            "only one of password, password_file and password_env",
            "cannot read",
        ],
    );
    expect(
        "username = \"gw\"\npassword_file = \"pw\"",
        7,
        &["password_file", "pw: cannot read"],
    );
    // TLS keys on a plain mqtt:// upstream are a mistake, not ignored.
    write(
        &d.join("edgeferry.toml"),
        "[upstream.cloud]\nurl = \"mqtt://h:1883\"\nca_file = \"ca.pem\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("edgeferry.toml:3:1:") && stderr.contains("mqtts://h:1883"),
        "{stderr}"
    );
    // And a good one passes.
    config("ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"");
    let out = edgeferry(&["check", "-c", "edgeferry.toml"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_broker_tls_and_password_file_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("rules/ok.toml"), "");
    write(&d.join("passwd"), "ok:$7$101$AAAA$AAAA\nbroken line\n");
    write(
        &d.join("edgeferry.toml"),
        "[broker]\ntls_listen = \"127.0.0.1:8883\"\npassword_file = \"passwd\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("edgeferry.toml:2:1:") && stderr.contains("needs tls_cert and tls_key"),
        "{stderr}"
    );
    assert!(
        stderr.contains("edgeferry.toml:3:1:") && stderr.contains("passwd:2: expected user:hash"),
        "{stderr}"
    );
    let ca = crate::pki::Ca::new("test CA");
    ca.issue(d, "a", &["gw"], false);
    ca.issue(d, "b", &["gw"], false);
    write(&d.join("passwd"), "");
    write(
        &d.join("edgeferry.toml"),
        "[broker]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"a.pem\"\ntls_key = \"b.key\"\npassword_file = \"passwd\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 2);
    assert!(
        stderr.contains("edgeferry.toml:4:1:") && stderr.contains("does not go with"),
        "{stderr}"
    );
    assert!(stderr.contains("has no users"), "{stderr}");
}

/// Hostile-run finding: `when = "1+1+…+1 > 0"` with 2,000 terms passed
/// `check` and then overflowed a worker's stack at the first event (30,000
/// aborted the daemon at start). Every chained operator class and deep
/// nesting is now refused by `check` and by `run`, located, with the limit.
#[test]
fn expressions_too_deep_to_evaluate_are_refused_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_small_config(d);
    for (name, when) in [
        ("plus", format!("{} > 0", vec!["1"; 2000].join("+"))),
        ("times", format!("{} > 0", vec!["1"; 2000].join("*"))),
        ("equals", vec!["true"; 2000].join(" == ")),
        ("and", vec!["true"; 30_000].join("&&")),
        (
            "parens",
            format!("{}true{}", "(".repeat(200), ")".repeat(200)),
        ),
    ] {
        write(
            &d.join("rules/deep.toml"),
            &format!(
                "[[rule]]\nname = \"{name}\"\nmatch = \"a/#\"\nwhen = \"{when}\"\nto = [{{ upstream = \"cloud\" }}]\n"
            ),
        );
        let stderr = check_fails(d, "edgeferry.toml", 2);
        assert!(
            stderr.contains("rules/deep.toml:4:") && stderr.contains("expression too large"),
            "{name}: {stderr:.300}"
        );
        let out = edgeferry(&["run", "-c", "edgeferry.toml"], d);
        assert_eq!(out.status.code(), Some(2), "{name}: run refuses it too");
    }
}

/// Hostile-run finding: `matches('(')` and an oversized repetition passed
/// `check`, and every pattern was compiled again for every event. Patterns
/// are now compiled once at load: invalid, oversized and computed ones are
/// refused by `check` and by `run`, located at the pattern.
#[cfg(feature = "regex")]
#[test]
fn patterns_that_cannot_be_compiled_once_are_refused_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_small_config(d);
    for (when, says) in [
        ("topic.matches('(')", "unclosed group"),
        ("topic.matches('[z-a]')", "invalid character class range"),
        ("topic.matches('x{2,1}')", "invalid repetition"),
        (r"topic.matches('\\\\w{1000}')", "compiles to more than"),
        ("topic.matches('(a{1,1000}){1,1000}')", "repetition"),
        ("topic.matches(payload.pattern)", "literal pattern"),
    ] {
        write(
            &d.join("rules/re.toml"),
            &format!(
                "[[rule]]\nname = \"re\"\nmatch = \"a/#\"\nwhen = \"{when}\"\nto = [{{ upstream = \"cloud\" }}]\n"
            ),
        );
        let stderr = check_fails(d, "edgeferry.toml", 2);
        assert!(
            stderr.contains("rules/re.toml:4:") && stderr.contains(says),
            "{when}: {stderr:.400}"
        );
        let out = edgeferry(&["run", "-c", "edgeferry.toml"], d);
        assert_eq!(out.status.code(), Some(2), "{when}: run refuses it too");
    }
    // A valid pattern still loads.
    write(
        &d.join("rules/re.toml"),
        "[[rule]]\nname = \"re\"\nmatch = \"a/#\"\nwhen = \"topic.matches('^a/[a-z]+$')\"\nto = [{ upstream = \"cloud\" }]\n",
    );
    let out = edgeferry(&["check", "-c", "edgeferry.toml"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `durability` is a deprecated alias now: `check` passes and warns, at its
/// line, with what the setting is taken as.
#[test]
fn check_warns_that_durability_is_deprecated_and_says_what_it_maps_to() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("rules")).unwrap();
    for (mode, means) in [
        ("always", "spill_after = \"0s\""),
        ("offline", "spill_after = \"1s\""),
    ] {
        write(
            &d.join("edgeferry.toml"),
            &format!(
                "[metrics]\nenabled = false\n[queue]\npath = \"q.db\"\ndurability = \"{mode}\"\n[upstream.cloud]\nurl = \"mqtt://127.0.0.1:1884\"\n"
            ),
        );
        let out = edgeferry(&["check", "-c", "edgeferry.toml"], d);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("edgeferry.toml:5:")
                && stderr.contains("queue.durability is deprecated")
                && stderr.contains(means),
            "{stderr}"
        );
    }
}

/// `edgeferry tail` against a running daemon: for each event on the
/// filter, what each matching rule did (applied, throttled, `when`
/// false) and where it went, then the row it got in the queue and that
/// row's acknowledgement; events off the filter are not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_what_each_rule_did_with_each_event_and_its_rows_ack() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/#").await;
    let gw = Gateway::start(d, upstream.port()).await;
    let metrics = gw.running.metrics_addr.expect("metrics on");
    write(
        &d.join("tail.toml"),
        &format!("[metrics]\nlisten = \"{metrics}\"\n"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeferry"))
        .args(["-c", "tail.toml", "tail", "sensors/#", "--json"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let m = gw.running.metrics.clone();
    wait_until("tail is watching", || m.trace.watched()).await;
    let sensor = Sensor::connect_as(gw.addr, "t-sensor").await;
    let hot = r#"{"value": 31.0, "unit": "C"}"#;
    sensor.publish("lab/not-shown", "{}").await;
    sensor.publish("sensors/yard/t1/temperature", hot).await;
    sensor.publish("sensors/yard/t1/temperature", hot).await;
    sensor
        .publish(
            "sensors/yard/t1/temperature",
            r#"{"value": 12.0, "unit": "C"}"#,
        )
        .await;
    sensor.wait_acked(4).await;
    cloud.wait_for(3).await;
    // Every line until the three events and their rows' acks are in.
    let (mut events, mut queued, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    while events.len() < 3 || acked.len() < 3 {
        let line = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("traced lines so far: {events:?} {queued:?} {acked:?}"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(q) = v.get("queued") {
            queued.push(q.clone());
        } else if let Some(a) = v.get("acked") {
            acked.push(a.clone());
        } else {
            events.push(v);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let alarm = |l: &serde_json::Value| {
        l["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == "temperature-alarm")
            .cloned()
            .unwrap()
    };
    for l in &events {
        assert_eq!(l["topic"], "sensors/yard/t1/temperature", "{l}");
        assert_eq!(l["client_id"], "t-sensor");
        assert!(
            l["to"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["upstream"] == "cloud"),
            "{l}"
        );
    }
    assert_eq!(alarm(&events[0])["step"], "applied", "{}", events[0]);
    assert!(
        events[0]["to"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["local"] == "alerts/yard/t1")
    );
    assert_eq!(alarm(&events[1])["step"], "held", "{}", events[1]);
    assert_eq!(alarm(&events[1])["reason"], "throttled");
    assert_eq!(alarm(&events[2])["step"], "when false", "{}", events[2]);
    // Each event's cloud row, by its event id, and that row acknowledged.
    for (e, q) in events.iter().zip(&queued) {
        assert_eq!(q["event_id"], e["event_id"], "{q} {e}");
        assert_eq!(q["upstream"], "cloud");
    }
    let ids = |v: &[serde_json::Value]| {
        let mut ids: Vec<i64> = v.iter().map(|x| x["id"].as_i64().unwrap()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&acked), ids(&queued), "{acked:?} {queued:?}");
    // Nobody watches once the tail is gone: routing goes back to untraced.
    wait_until("the tail's watch ended", || !m.trace.watched()).await;
    gw.stop().await;
}

/// `edgeferry schema validate` on the example rules' contracts: a sample
/// that keeps one exits 0, one that breaks it lists every problem with
/// its pointer and exits 1, an unknown version says so, and an unknown
/// schema name or file are told apart by their exit codes.
#[test]
fn schema_validate_checks_a_sample_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    write(
        &d.join("edgeferry.toml"),
        &format!(
            "[rules]\ndir = \"{}\"\n[metrics]\nenabled = false\n[queue]\npath = \"q.db\"\n[upstream.cloud]\nurl = \"mqtt://127.0.0.1:1884\"\n",
            repo.join("rules").display()
        ),
    );
    write(&d.join("good.json"), r#"{"value": 21.5, "unit": "C"}"#);
    write(&d.join("bad.json"), r#"{"val": "21.5", "unit": "K"}"#);
    write(&d.join("door-v3.json"), r#"{"v": 3, "open": true}"#);
    let run = |args: &[&str]| {
        let mut all = vec!["-c", "edgeferry.toml", "schema"];
        all.extend_from_slice(args);
        let out = edgeferry(&all, d);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };

    let (code, text) = run(&["validate", "temperature", "good.json"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok: the JSON payload keeps schema \"temperature\""),
        "{text}"
    );

    let (code, text) = run(&["validate", "temperature", "bad.json"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("at \"/unit\""), "{text}");
    assert!(text.contains("\"value\" is a required property"), "{text}");
    assert!(text.contains("3 problem(s)"), "{text}");

    let (code, text) = run(&["validate", "door", "door-v3.json"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("version \"3\" of \"door\" is not declared (declared: 1, 2)"),
        "{text}"
    );
    assert!(text.contains("reason \"schema_version\""), "{text}");

    let (code, text) = run(&["validate", "door", "door-v3.json", "--topic", "sensors/x"]);
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("is not one schema \"door\" applies to"),
        "{text}"
    );

    let (code, text) = run(&["validate", "temp", "good.json"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("declared: temperature, humidity, door, power"),
        "{text}"
    );

    let (code, text) = run(&["validate", "door", "missing.json"]);
    assert_eq!(code, Some(3), "{text}");

    let (code, text) = run(&["list"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("door v2 (current)  match \"doors/+/+\"  enforced"),
        "{text}"
    );
}

/// `edgeferry check` on broken contracts: every problem at its file:line
/// (a schema file that is not JSON, a `$ref` that does not resolve, a
/// name and version declared twice, a rule naming a schema nobody
/// declared), exit 2; a schema file that cannot be read at all, exit 3.
#[test]
fn check_reports_broken_contracts_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_small_config(d);
    write(&d.join("rules/broken.json"), r#"{"type": "object", "#);
    write(
        &d.join("rules/refs.json"),
        r##"{"$ref": "other.json#/$defs/reading"}"##,
    );
    write(&d.join("rules/ok.json"), r#"{"type": "object"}"#);
    let rules = r#"[[schema]]
name = "broken"
match = "a/+"
file = "broken.json"

[[schema]]
name = "refs"
match = "b/+"
file = "refs.json"

[[schema]]
name = "door"
version = 1
match = "d/+"
file = "ok.json"
version_field = "v"

[[schema]]
name = "door"
version = 1
match = "d/+"
file = "ok.json"
version_field = "v"

[[rule]]
name = "r"
match = "a/+"
schema = "nosuch"
to = [{ upstream = "cloud" }]

[[rule]]
name = "s"
match = "a/+"
schema = "broken"
to = [{ upstream = "cloud" }]
"#;
    write(&d.join("rules/a.toml"), rules);
    let stderr = check_fails(d, "edgeferry.toml", 2);
    for want in [
        "a.toml:4:8: schema \"broken\":",
        "is not JSON",
        "a.toml:9:8: schema \"refs\":",
        "other.json",
        "a.toml:19:8: schema \"door\" version 1 is declared twice (also at",
        "a.toml:28:10: rule \"r\": schema \"nosuch\" is not declared (declared: door)",
        "4 error(s)",
    ] {
        assert!(stderr.contains(want), "{want:?} not in:\n{stderr}");
    }
    write(
        &d.join("rules/b.toml"),
        "[[schema]]\nname = \"gone\"\nmatch = \"g/+\"\nfile = \"missing.json\"\n",
    );
    let stderr = check_fails(d, "edgeferry.toml", 3);
    assert!(
        stderr.contains("b.toml:4:8: schema \"gone\": cannot read"),
        "{stderr}"
    );
}
