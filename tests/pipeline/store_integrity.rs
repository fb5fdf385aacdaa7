//! The store never serves bad bytes: stored outputs are checked against their manifest
//! before they are used or reported cached, corrupted entries are quarantined (never
//! deleted) and rebuilt, and `run --verify` re-reads everything.

use crate::common;

use std::path::Path;

use common::Sandbox;

const PIPELINE: &str = r#"name: integrity
stages:
  make:
    kind: command
    with: { cmd: "echo good > out.txt" }
  use:
    kind: command
    inputs: { m: make/out.txt }
    with: { cmd: "cat $TY_IN_M $TY_IN_M > twice.txt" }
"#;

fn flip_first_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// Flips a byte and puts size, mtime and inode back as they were.
fn flip_first_byte_silently(path: &Path) {
    let before = std::fs::metadata(path).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x20;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&bytes[..1], 0).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
}

fn quarantined(sandbox: &Sandbox) -> Vec<String> {
    std::fs::read_dir(sandbox.path(".trainyard/quarantine"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_corrupted_stored_output_is_quarantined_and_rebuilt() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    flip_first_byte(&entry.join("out.txt"));

    // status says what will happen and moves nothing.
    let status = sandbox.ok(&["status", "p.yaml"]);
    assert!(
        status.contains("its stored output was corrupted: `out.txt` differs from its manifest"),
        "{status}"
    );
    assert!(quarantined(&sandbox).is_empty());

    let console = sandbox.ok(&["run", "p.yaml"]);
    assert!(
        console.contains("its stored output was corrupted: `out.txt` differs from its manifest")
            && console.contains("moved to .trainyard/quarantine/make-"),
        "{console}"
    );
    assert_eq!(sandbox.executed(), ["make"], "{console}");
    assert_eq!(sandbox.read("runs/latest/outputs/make/out.txt"), "good\n");
    let moved = quarantined(&sandbox);
    assert_eq!(moved.len(), 1);
    // Quarantined, not deleted: the bad bytes are still there to look at.
    assert_eq!(
        sandbox.read(&format!(".trainyard/quarantine/{}/out.txt", moved[0])),
        "Good\n"
    );
    sandbox.ok(&["audit", "runs/latest"]);
}

#[test]
fn a_forced_stage_never_reads_a_corrupted_upstream() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    flip_first_byte(&entry.join("out.txt"));
    sandbox.ok(&["run", "p.yaml", "--force", "use"]);
    assert_eq!(sandbox.executed(), ["make", "use"]);
    assert_eq!(
        sandbox.read("runs/latest/outputs/use/twice.txt"),
        "good\ngood\n"
    );
}

#[test]
fn verify_finds_a_change_that_kept_size_mtime_and_inode() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    // Let the files age past the racy window so their signatures are trusted.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    flip_first_byte_silently(&entry.join("out.txt"));

    // The signature is unchanged, so a plain run trusts it (that is what keeps a
    // no-op run fast); --verify reads the bytes.
    sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty());
    let console = sandbox.ok(&["run", "p.yaml", "--verify"]);
    assert!(
        console.contains("its stored output was corrupted: `out.txt` differs"),
        "{console}"
    );
    assert_eq!(sandbox.executed(), ["make"]);
    assert_eq!(sandbox.read("runs/latest/outputs/make/out.txt"), "good\n");
    assert_eq!(quarantined(&sandbox).len(), 1);
}

#[test]
fn an_added_or_removed_file_is_corruption_too() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    std::fs::write(entry.join("extra.txt"), "x").unwrap();
    let console = sandbox.ok(&["run", "p.yaml"]);
    assert!(
        console.contains("`extra.txt` was added after it was published"),
        "{console}"
    );
    let entry = sandbox.store_entries("make")[0].clone();
    std::fs::remove_file(entry.join("out.txt")).unwrap();
    let console = sandbox.ok(&["run", "p.yaml"]);
    assert!(console.contains("`out.txt` is missing"), "{console}");
    assert_eq!(quarantined(&sandbox).len(), 2);
}

#[test]
fn gc_removes_unreferenced_entries_and_stale_scratch_only() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let first_run = std::fs::read_link(sandbox.path("runs/latest")).unwrap();
    let old_make = sandbox.store_entries("make")[0].clone();
    sandbox.write("p.yaml", &PIPELINE.replace("echo good", "echo better"));
    sandbox.ok(&["run", "p.yaml"]);
    // A failing stage: its scratch keeps only the log.
    sandbox.write(
        "bad.yaml",
        "name: bad\nstages:\n  broken:\n    kind: command\n    with: { cmd: \"head -c 100000 /dev/zero > big.bin; exit 3\" }\n",
    );
    sandbox.fails(&["run", "bad.yaml"]);
    let scratch: Vec<_> = std::fs::read_dir(sandbox.path(".trainyard/work"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert_eq!(scratch.len(), 1, "{scratch:?}");
    let left: Vec<_> = std::fs::read_dir(&scratch[0])
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["stage.log"]);

    // Every entry is still referenced by a run record: only the scratch goes.
    let dry = sandbox.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would remove  .trainyard/work/broken-"),
        "{dry}"
    );
    assert!(!dry.contains(".trainyard/store/"), "{dry}");

    // Once the first run's directory is deleted, its entries are garbage.
    let first_run = if first_run.is_absolute() {
        first_run
    } else {
        sandbox.path("runs").join(first_run)
    };
    std::fs::remove_dir_all(&first_run).unwrap();
    let dry = sandbox.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains(&format!(
            "would remove  {}",
            old_make.strip_prefix(sandbox.path("")).unwrap().display()
        )),
        "{dry}"
    );
    assert!(old_make.exists(), "--dry-run removes nothing");
    let done = sandbox.ok(&["gc"]);
    assert!(done.contains("gc: removed 3 path(s)"), "{done}");
    assert!(!old_make.exists());
    assert_eq!(sandbox.store_entries("make").len(), 1);
    assert!(
        std::fs::read_dir(sandbox.path(".trainyard/work"))
            .unwrap()
            .next()
            .is_none()
    );
    sandbox.ok(&["audit", "runs/latest"]);
    let again = sandbox.ok(&["run", "p.yaml"]);
    assert!(sandbox.executed().is_empty(), "{again}");
}

/// A run killed between the two renames of a `--force` publish leaves the only copy of
/// the entry in `.trainyard/work/replaced-*`: gc must not delete it, and the next run or
/// gc puts it back.
#[test]
fn an_entry_moved_aside_by_a_killed_force_run_is_restored_never_deleted() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    let name = entry.file_name().unwrap().to_string_lossy().into_owned();
    let aside = sandbox.path(&format!(".trainyard/work/replaced-make-{name}-999999"));
    std::fs::create_dir_all(aside.parent().unwrap()).unwrap();
    std::fs::rename(&entry, &aside).unwrap();

    let dry = sandbox.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would restore  .trainyard/work/replaced-make-"),
        "{dry}"
    );
    assert!(
        !dry.contains("would remove  .trainyard/work/replaced-"),
        "{dry}"
    );
    assert!(aside.exists(), "--dry-run moves nothing");

    let run = sandbox.ok(&["run", "p.yaml"]);
    assert!(run.contains("note: restored"), "{run}");
    assert!(sandbox.executed().is_empty(), "{run}");
    assert!(entry.join("out.txt").is_file());
    assert!(!aside.exists());

    // gc restores it as well, and an aside copy whose entry exists again is garbage.
    std::fs::rename(&entry, &aside).unwrap();
    let done = sandbox.ok(&["gc"]);
    assert!(
        done.contains("restore  .trainyard/work/replaced-make-"),
        "{done}"
    );
    assert!(entry.join("out.txt").is_file(), "{done}");
    sandbox.ok(&["audit", "runs/latest"]);
}

/// An entry whose manifest is unreadable, empty or for another stage is damaged, not
/// missing: it is quarantined with the real reason, never deleted.
#[test]
fn an_entry_with_a_bad_manifest_is_quarantined_with_the_reason() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    for (manifest, reason) in [
        (Some("{not json"), "is not a valid manifest"),
        (Some("{}"), "is not a valid manifest"),
        (None, "is missing"),
    ] {
        let entry = sandbox.store_entries("make")[0].clone();
        match manifest {
            Some(text) => std::fs::write(entry.join("manifest.json"), text).unwrap(),
            None => std::fs::remove_file(entry.join("manifest.json")).unwrap(),
        }
        std::fs::write(entry.join("marker"), "look at me").unwrap();
        let before = quarantined(&sandbox).len();
        let status = sandbox.ok(&["status", "p.yaml"]);
        assert!(status.contains(reason), "{status}");
        let console = sandbox.ok(&["run", "p.yaml"]);
        assert!(
            console.contains(&format!("`manifest.json` {reason}"))
                && console.contains("moved to .trainyard/quarantine/make-"),
            "{console}"
        );
        assert_eq!(sandbox.executed(), ["make"], "{console}");
        let moved = quarantined(&sandbox);
        assert_eq!(moved.len(), before + 1);
        assert!(
            moved.iter().any(|name| sandbox
                .path(&format!(".trainyard/quarantine/{name}/marker"))
                .exists()),
            "{moved:?}"
        );
        sandbox.ok(&["audit", "runs/latest"]);
    }
}

/// `--force` replaces a stored output; a damaged one is quarantined, not deleted.
#[test]
fn forcing_over_a_damaged_entry_quarantines_it() {
    let sandbox = Sandbox::new();
    sandbox.write("p.yaml", PIPELINE);
    sandbox.ok(&["run", "p.yaml"]);
    let entry = sandbox.store_entries("make")[0].clone();
    flip_first_byte(&entry.join("out.txt"));
    let console = sandbox.ok(&["run", "p.yaml", "--force", "make"]);
    assert!(
        console.contains("the stored output of `make` being replaced was damaged"),
        "{console}"
    );
    let moved = quarantined(&sandbox);
    assert_eq!(moved.len(), 1, "{console}");
    assert_eq!(
        sandbox.read(&format!(".trainyard/quarantine/{}/out.txt", moved[0])),
        "Good\n"
    );
    // An intact entry is simply replaced.
    sandbox.ok(&["run", "p.yaml", "--force", "make"]);
    assert_eq!(quarantined(&sandbox).len(), 1);
    sandbox.ok(&["audit", "runs/latest"]);
}
