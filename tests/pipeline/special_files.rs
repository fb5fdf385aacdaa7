//! Hashing reads only what it should: no FIFOs, devices or sockets, links in outputs
//! kept as links and never out of the output, pipeline files that are files, and
//! Ctrl-C honoured while a large input is hashed.

use crate::common;

use std::time::{Duration, Instant};

use common::{Sandbox, text};

fn one_command(sandbox: &Sandbox, cmd: &str) {
    sandbox.write(
        "p.yaml",
        &format!(
            "name: special\nstages:\n  make:\n    kind: command\n    with: {{ cmd: \"{cmd}\" }}\n"
        ),
    );
}

#[test]
fn a_fifo_in_an_output_is_an_error_not_a_hang() {
    let sandbox = Sandbox::new();
    one_command(&sandbox, "mkfifo pipe; echo x > x.txt");
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("pipe is a FIFO (named pipe)"), "{error}");
    assert!(sandbox.store_entries("make").is_empty());
}

#[test]
fn links_out_of_an_output_are_refused() {
    for target in ["/dev/zero", "../../../../etc/hostname", "/etc/hostname"] {
        let sandbox = Sandbox::new();
        one_command(&sandbox, &format!("ln -s {target} link"));
        let error = sandbox.fails(&["run", "p.yaml"]);
        assert!(
            error.contains(&format!(
                "link is a symbolic link to {target}, outside the output"
            )),
            "{error}"
        );
        assert!(sandbox.store_entries("make").is_empty());
    }
}

/// Each link's text may stay inside while a chain of them climbs out: `x -> b/..` with
/// `b -> .` is the output's parent folder.
#[test]
fn a_chain_of_links_cannot_climb_out_of_an_output() {
    for (cmd, bad) in [
        ("ln -s . b; ln -s b/.. x", Some("x")),
        (
            "ln -s . b; ln -s b/.. x; ln -s x/.. y; ln -s y/etc/hostname w",
            Some("w"),
        ),
        (
            "mkdir d; ln -s d e; ln -s e/not-yet.txt dangling; ln -s e/../d f",
            None,
        ),
    ] {
        let sandbox = Sandbox::new();
        one_command(&sandbox, cmd);
        match bad {
            Some(link) => {
                let error = sandbox.fails(&["run", "p.yaml"]);
                assert!(
                    error.contains(&format!("{link} is a symbolic link to"))
                        && error.contains("outside the output"),
                    "{cmd}: {error}"
                );
                assert!(sandbox.store_entries("make").is_empty());
            }
            None => {
                sandbox.ok(&["run", "p.yaml"]);
                sandbox.ok(&["audit", "runs/latest"]);
            }
        }
    }
}

#[test]
fn links_inside_an_output_are_kept_as_links() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "p.yaml",
        r#"name: links
stages:
  make:
    kind: command
    with: { cmd: "mkdir sub; echo data > sub/real.txt; ln -s sub/real.txt alias; ln -s ../sub sub/self" }
  read:
    kind: command
    inputs: { alias: make/alias }
    with: { cmd: "cat $TY_IN_ALIAS > copy.txt" }
"#,
    );
    sandbox.ok(&["run", "p.yaml"]);
    assert_eq!(sandbox.read("runs/latest/outputs/read/copy.txt"), "data\n");
    let entry = &sandbox.store_entries("make")[0];
    assert!(
        std::fs::symlink_metadata(entry.join("alias"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.join("manifest.json")).unwrap())
            .unwrap();
    // The link is hashed as a link: its size is that of its target's name.
    assert_eq!(manifest["files"]["alias"]["size"], "sub/real.txt".len());
    assert!(manifest["files"].get("sub/self/real.txt").is_none());
    sandbox.ok(&["audit", "runs/latest"]);
    let rerun = sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty(), "{rerun}");
}

#[test]
fn an_input_that_is_a_device_is_an_error() {
    let sandbox = Sandbox::new();
    std::os::unix::fs::symlink("/dev/zero", sandbox.path("zero.bin")).unwrap();
    sandbox.write(
        "p.yaml",
        "name: dev\nstages:\n  read:\n    kind: command\n    inputs: { z: zero.bin }\n    with: { cmd: 'true' }\n",
    );
    let started = Instant::now();
    let error = sandbox.fails(&["run", "p.yaml"]);
    assert!(error.contains("zero.bin is a device"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_pipeline_must_be_a_regular_file() {
    let sandbox = Sandbox::new();
    std::os::unix::fs::symlink("/dev/zero", sandbox.path("zero.yaml")).unwrap();
    let output = sandbox.trainyard(&["run", "zero.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("zero.yaml is not a regular file"),
        "{}",
        text(&output)
    );
    let fifo = sandbox.path("fifo.yaml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let error = sandbox.fails(&["resolve", "fifo.yaml"]);
    assert!(error.contains("fifo.yaml is not a regular file"), "{error}");
    // Larger than the limit: refused without parsing.
    let big = std::fs::File::create(sandbox.path("big.yaml")).unwrap();
    big.set_len(64 << 20).unwrap();
    let error = sandbox.fails(&["resolve", "big.yaml"]);
    assert!(error.contains("big.yaml is larger than 16 MiB"), "{error}");
}

#[test]
fn ctrl_c_stops_the_hashing_of_a_large_input_within_a_second() {
    let sandbox = Sandbox::new();
    // Sparse: takes no disk, but hashing 64 GiB of zeros takes far longer than the test.
    let big = std::fs::File::create(sandbox.path("big.bin")).unwrap();
    big.set_len(64 << 30).unwrap();
    sandbox.write(
        "p.yaml",
        "name: big\nstages:\n  read:\n    kind: command\n    inputs: { b: big.bin }\n    with: { cmd: 'true' }\n",
    );
    let child = sandbox.spawn(&["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    let waited = signalled.elapsed();
    assert_eq!(output.status.code(), Some(130), "{}", text(&output));
    // One second is the promise; the bound leaves room for a loaded CI machine.
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
}

/// A command that hard-links an input into its output (`ln "$TY_IN_X" copy.txt`) must
/// not let a later edit of the input change the published output.
#[test]
fn a_hard_linked_output_file_owns_its_bytes() {
    let sandbox = Sandbox::new();
    sandbox.write("in.txt", "v1\n");
    sandbox.write(
        "p.yaml",
        "name: hl\nstages:\n  s:\n    kind: command\n    inputs: { x: in.txt }\n    with: { cmd: 'mkdir sub; ln \"$TY_IN_X\" copy.txt; ln \"$TY_IN_X\" sub/again.txt' }\n",
    );
    sandbox.ok(&["run", "p.yaml"]);
    let first = std::fs::read_link(sandbox.path("runs/latest")).unwrap();
    let first = sandbox.path("runs").join(first);
    let mut input = std::fs::OpenOptions::new()
        .append(true)
        .open(sandbox.path("in.txt"))
        .unwrap();
    std::io::Write::write_all(&mut input, b"v2\n").unwrap();
    assert_eq!(sandbox.read("runs/latest/outputs/s/copy.txt"), "v1\n");
    assert_eq!(sandbox.read("runs/latest/outputs/s/sub/again.txt"), "v1\n");
    // The audit sees the changed input, and nothing else.
    let audit = sandbox.fails(&["audit", first.to_str().unwrap()]);
    assert!(audit.contains("input `x` differs"), "{audit}");
    assert!(!audit.contains("output"), "{audit}");
}
