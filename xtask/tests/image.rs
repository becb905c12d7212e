//! `cargo xtask format` and `cargo xtask inspect`, run as the binary.

use pcache::format::*;
use pcache::records::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("xtask-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn format_image(path: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["format", path.to_str().unwrap(), "--size", "512M"];
    args.extend_from_slice(extra);
    xtask(&args)
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let o = xtask(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn format_then_inspect() {
    let d = TempDir::new("fmt");
    let img = d.file("a.img");
    let o = format_image(&img, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("outcome: formatted"));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 512 * MIB);
    let before = std::fs::metadata(&img).unwrap().modified().unwrap();

    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "superblock @4096: valid (seg_num 31, flags 0x0)",
        "slot 1 @12288: valid, seq 1: seg_id 0, n_segs 31, flags 0x1182",
        "<- current",
        "chain: 31 of 31 segment(s)",
        "0..=29: info slot0* seq 2 flags 0x3 next +1",
        "log ends at 0:0: terminator (zero record)",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }

    let j = inspect_json(&img);
    assert_eq!(j["superblock"]["state"]["state"], "valid");
    assert_eq!(j["cache_info"]["current"], 1);
    assert_eq!(j["cache_info"]["slots"][1]["record"]["flags"], 0x1182);
    assert_eq!(j["key_tail"]["current"], 0);
    assert_eq!(j["segments"].as_array().unwrap().len(), 31);
    assert_eq!(
        j["segments"][3]["info"]["slots"][0]["record"]["next_seg"],
        4
    );
    assert_eq!(j["chain"]["psegs"].as_array().unwrap().len(), 31);
    assert_eq!(j["log"]["ksets"], 0);
    assert_eq!(j["log"]["end"]["stop"]["error"]["kind"], "terminator");
    // inspect never writes.
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), before);

    // Existing file: refused without --force; --force, data_crc and strict work.
    let o = format_image(&img, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already exists; pass --force"),
        "{}",
        stderr(&o)
    );
    let o = format_image(&img, &["--force", "--data-crc", "--mode", "strict"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("flags 0x1183"));
    assert!(stdout(&o).contains("mode: strict"));
}

#[test]
fn format_refuses_small_sizes() {
    let d = TempDir::new("small");
    let img = d.file("s.img");
    for size in ["511M", "1000", "0"] {
        let o = xtask(&["format", img.to_str().unwrap(), "--size", size]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("below the minimum"), "{}", stderr(&o));
        assert!(!img.exists());
    }
    let o = xtask(&["format", img.to_str().unwrap(), "--size", "lots"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid size"), "{}", stderr(&o));
}

#[test]
fn inspect_bad_inputs_get_clear_messages() {
    let d = TempDir::new("bad");
    // Missing file.
    let o = xtask(&["inspect", d.file("missing.img").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot open"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));

    // Smaller than 512 MiB.
    let small = d.file("small.img");
    sparse(&small, 64 * MIB);
    let o = xtask(&["inspect", small.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("smaller than the 512 MiB"),
        "{}",
        stderr(&o)
    );

    // 512 MiB of zeros.
    let zeros = d.file("zeros.img");
    sparse(&zeros, 512 * MIB);
    let o = xtask(&["inspect", zeros.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("unformatted (magic 0)"));
    assert!(stdout(&o).contains("no valid copy: an activation treats this as a new cache"));
    let j = inspect_json(&zeros);
    assert_eq!(j["superblock"]["state"]["state"], "unformatted");
    assert_eq!(j["seg_num_source"], "device-size");
    assert!(j["cache_info"]["current"].is_null());
    assert!(j["log"]["not_walked"]
        .as_str()
        .unwrap()
        .contains("no valid cache_info"));

    // Random bytes over the metadata and every segment header.
    let random = d.file("random.img");
    sparse(&random, 512 * MIB);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    write_at(&random, 0, &rnd(1 << 20));
    for p in 0..31 {
        write_at(&random, seg_off(p), &rnd(16 * 1024));
    }
    let o = xtask(&["inspect", random.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("is not pcache's"), "{}", stdout(&o));
    inspect_json(&random);
}

fn formatted(d: &TempDir, name: &str) -> PathBuf {
    let img = d.file(name);
    let o = format_image(&img, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    img
}

#[test]
fn inspect_forged_seg_num() {
    let d = TempDir::new("segnum");
    let img = formatted(&d, "f.img");
    write_at(&img, SB_OFF, &Superblock::new(u32::MAX, 0).to_bytes());
    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("seg_num 4294967295 out of range (1..=31 for this device)"),
        "{text}"
    );
    assert!(
        text.contains("inspecting 31 segment(s) (from the device size"),
        "{text}"
    );
    // An activation refuses it too.
    let j = inspect_json(&img);
    assert_eq!(j["superblock"]["state"]["state"], "seg-num-out-of-range");
    // And a cache_info whose n_segs is forged.
    let mut ci = CacheInfo {
        n_segs: (1 << 30).into(),
        flags: 0x1182.into(),
        ..Default::default()
    };
    ci.header.seq = 9;
    write_at(&img, CACHE_INFO_OFF, &ci.to_bytes());
    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("cache_info n_segs 1073741824 out of range (1..=31)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn inspect_hostile_key_sets() {
    let d = TempDir::new("kset");
    // key_num out of range under a wrong CRC: a torn record, the ordinary end.
    let img = formatted(&d, "t.img");
    let mut h = KsetHeader {
        crc: 0x1234.into(),
        key_num: 4000.into(),
        magic: KSET_MAGIC.into(),
        flags: 0.into(),
    };
    write_at(&img, data_pos(0, 0), h.as_bytes());
    let j = inspect_json(&img);
    assert_eq!(j["log"]["end_is_ordinary"], true);
    assert_eq!(j["log"]["end"]["stop"]["error"]["kind"], "crc-mismatch");

    // The same header under a valid CRC (over 4000 zero keys): hostile.
    let img = formatted(&d, "k.img");
    let mut rec = vec![0u8; KSET_HEADER_SIZE + 4000 * KEY_SIZE];
    rec[..24].copy_from_slice(h.as_bytes());
    h.crc.set(pcache_crc(&rec[4..]));
    write_at(&img, data_pos(0, 0), h.as_bytes());
    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("log ends at 0:0: key_num 4000 out of range (1..=128)"),
        "{text}"
    );
    assert!(text.contains("not an ordinary end"), "{text}");
    let j = inspect_json(&img);
    assert_eq!(j["log"]["end_is_ordinary"], false);
    assert_eq!(
        j["log"]["end"]["stop"]["error"]["kind"],
        "key-num-out-of-range"
    );

    // A valid key-set, then a LAST record whose next segment is out of range.
    let img = formatted(&d, "n.img");
    let k1 = KeyOnMedia {
        off: 0.into(),
        len: 4096.into(),
        cache_seg_id: 1.into(),
        ..Default::default()
    };
    let k2 = KeyOnMedia {
        off: (1 << 20).into(),
        len: 8192.into(),
        flags: KEY_F_CLEAN.into(),
        cache_seg_id: 2.into(),
        cache_seg_off: 4096.into(),
        ..Default::default()
    };
    let ks = Kset::Keys { keys: vec![k1, k2] }.to_bytes();
    write_at(&img, data_pos(0, 0), &ks);
    let last = Kset::Last {
        next_cache_seg_id: 99,
    }
    .to_bytes();
    write_at(&img, data_pos(0, ks.len() as u32), &last);
    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("1 key-set(s), 2 key(s)"), "{text}");
    assert!(
        text.contains("off 0x100000 len 8192 -> segment 2 (physical 2) offset 4096 gen 0 clean"),
        "{text}"
    );
    assert!(
        text.contains("log ends at 0:104: next segment id 99 out of range (n_segs 31)"),
        "{text}"
    );
    let j = inspect_json(&img);
    assert_eq!(j["log"]["records"][0]["keys"][1]["key"]["len"], 8192);
    assert_eq!(j["log"]["records"][0]["keys"][1]["pseg"], 2);
    assert_eq!(j["log"]["end"]["pos"]["seg_off"], 104);
}

/// A sparse file claiming the largest device ext4 allows (16 TiB, the largest
/// legal seg_num) with only its superblock written: the never-written segments
/// are one range, not read one by one, and the output stays small.
#[test]
fn inspect_huge_sparse_image_is_bounded() {
    let d = TempDir::new("huge");
    let img = d.file("huge.img");
    let f = std::fs::File::create(&img).unwrap();
    // ext4's limit is 16 TiB - 4 KiB; smaller file systems get 1 TiB.
    let size = [(16u64 << 40) - 4096, 1 << 40]
        .into_iter()
        .find(|&s| f.set_len(s).is_ok())
        .expect("a sparse file of 1 TiB");
    drop(f);
    let seg_num = pcache::cache_dev::max_seg_num(size);
    assert!(seg_num >= 65_535, "{seg_num}");
    write_at(&img, SB_OFF, &Superblock::new(seg_num, 0).to_bytes());

    let o = xtask(&["inspect", img.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.len() < 16 << 10,
        "{} bytes of JSON",
        o.stdout.len()
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["superblock"]["state"]["state"], "valid");
    assert_eq!(j["seg_num"], seg_num);
    assert_eq!(j["segments"].as_array().unwrap().len(), 0);
    assert_eq!(j["segment_counts"]["total"], seg_num);
    assert_eq!(j["segment_counts"]["unwritten"], seg_num);
    assert_eq!(j["segment_counts"]["not_listed"], 0);
    assert_eq!(
        j["unwritten_segments"],
        serde_json::json!([{"first": 0, "last": seg_num - 1}])
    );

    let o = xtask(&["inspect", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.len() < 16 << 10, "{} bytes of text", text.len());
    assert!(
        text.contains(&format!("0..={}: never written", seg_num - 1)),
        "{text}"
    );
}

/// `--max-segments` bounds the segments read and listed; every segment is
/// still counted, and the chain and the log do not depend on it.
#[test]
fn inspect_segment_budget() {
    let d = TempDir::new("budget");
    let img = formatted(&d, "b.img");
    let o = xtask(&[
        "inspect",
        img.to_str().unwrap(),
        "--json",
        "--max-segments",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["segments"].as_array().unwrap().len(), 4);
    assert_eq!(j["segment_counts"]["total"], 31);
    assert_eq!(j["segment_counts"]["listed"], 4);
    assert_eq!(j["segment_counts"]["not_listed"], 27);
    assert_eq!(j["chain"]["psegs"].as_array().unwrap().len(), 31);
    assert_eq!(j["log"]["end"]["stop"]["error"]["kind"], "terminator");
    let o = xtask(&["inspect", img.to_str().unwrap(), "--max-segments", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("4..=30: not read (beyond the budget of 4 segments)"));
}

/// Runs xtask, killing it (and failing) if it takes longer than 60 s: a
/// command that blocks on its input must not hang the test run.
fn xtask_within_60s(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run xtask");
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("xtask {args:?} blocked");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(p: &Path) {
    let o = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(o.success());
}

#[test]
fn a_fifo_is_refused_by_inspect_format_and_reproduce_without_blocking() {
    let d = TempDir::new("fifo");
    let fifo = d.file("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    for args in [
        vec!["inspect", f],
        vec!["inspect", f, "--json"],
        vec!["format", f, "--size", "512M", "--force"],
        vec!["format", f, "--size", "512M"],
        vec!["reproduce", "--pmem", f],
    ] {
        let o = xtask_within_60s(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains("is a FIFO"), "{args:?}: {}", stderr(&o));
    }
    // Still a FIFO: nothing replaced it.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn directories_and_character_devices_are_named_not_sized() {
    let d = TempDir::new("dir");
    let dir = d.0.to_str().unwrap();
    let o = xtask(&["inspect", dir]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("4096 bytes"), "{}", stdout(&o));
    let o = xtask(&["format", dir, "--size", "512M", "--force"]);
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    let o = xtask(&["inspect", "/dev/null"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("character device") && stderr(&o).contains("/dev/pmem0"),
        "{}",
        stderr(&o)
    );
    let o = xtask_within_60s(&["reproduce", "--pmem", "/dev/null"]);
    assert!(stderr(&o).contains("character device"), "{}", stderr(&o));
}

#[test]
fn a_format_that_fails_leaves_no_file_it_created() {
    let d = TempDir::new("big");
    let img = d.file("big.img");
    // ext4 (this project's machines) holds at most 16 TiB per file.
    let o = xtask(&["format", img.to_str().unwrap(), "--size", "17T"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(!img.exists(), "format left {} behind", img.display());
    // A retry does not ask for --force.
    let o = xtask(&["format", img.to_str().unwrap(), "--size", "17T"]);
    assert!(!stderr(&o).contains("--force"), "{}", stderr(&o));
    // A file it did not create stays, even when --force fails.
    sparse(&img, 4096);
    let o = xtask(&["format", img.to_str().unwrap(), "--size", "17T", "--force"]);
    assert!(!o.status.success());
    assert!(img.exists(), "a user's file was removed");
}

/// A loop device over a formatted image: inspected read-only with its size
/// from the device. Needs root and `losetup`.
#[test]
#[ignore = "needs root and losetup (a loop device)"]
fn a_block_device_is_inspected_with_its_real_size() {
    let d = TempDir::new("loop");
    let img = d.file("a.img");
    let o = format_image(&img, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup failed");
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let o = xtask(&["inspect", &dev]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("{}", 512 * MIB)),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("superblock @4096: valid"),
        "{}",
        stdout(&o)
    );
    let o = xtask(&["format", &dev, "--size", "512M", "--force"]);
    assert!(stderr(&o).contains("is a block device"), "{}", stderr(&o));
}
