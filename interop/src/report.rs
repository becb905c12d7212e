//! What a run writes: `result.json` and `findings.md`.

use crate::cases::{CaseResult, Comparison};
use serde::Serialize;
use std::fmt::Write as _;

/// The whole run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub kernel_release: &'static str,
    pub module_sha256: String,
    pub cases: Vec<CaseResult>,
    pub passed: bool,
}

/// `findings.md`: every disagreement with both sides, and the kernel's own
/// evidence for the hazards strict mode predicts and the kernel confirms
/// (states refused for ever, the older cache brought back, crafted chains
/// activated), with commands to reproduce each with stock tools only.
pub fn findings(run: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Findings: Linux {} dm-pcache (module sha256 {})\n",
        run.kernel_release, run.module_sha256
    );
    let all: Vec<&Comparison> = run.cases.iter().flat_map(|c| &c.comparisons).collect();
    let disagree: Vec<&&Comparison> = all.iter().filter(|c| !c.agree).collect();
    let _ = writeln!(
        s,
        "## Disagreements between strict mode and the kernel ({})\n",
        disagree.len()
    );
    if disagree.is_empty() {
        let _ = writeln!(
            s,
            "None: on every image the kernel did what strict mode predicts, byte for byte.\n"
        );
    }
    for c in &disagree {
        entry(&mut s, c);
    }
    let confirmed = |pred: &dyn Fn(&Comparison) -> bool| -> Vec<&Comparison> {
        all.iter().copied().filter(|c| c.agree && pred(c)).collect()
    };
    let sections: [(&str, &str, Vec<&Comparison>); 3] = [
        (
            "Refused for ever after a power cut",
            "A power cut left the device in a state the kernel refuses at every activation (a refusal writes nothing, so the next activation sees the same bytes). Strict mode predicted each one.",
            confirmed(&|c| c.about.starts_with("crash-mid") && c.strict.outcome == pcache::Outcome::Refused),
        ),
        (
            "The older cache comes back",
            "A power cut during the format of a device that held an older cache (its superblock magic zeroed to ask for a new cache) left the older cache's metadata valid: the kernel opened the older cache instead of formatting. Strict mode predicted each one.",
            confirmed(&|c| c.about.contains("(older cache back)")),
        ),
        (
            "Crafted metadata the kernel accepts",
            "Images with valid CRCs over values no kernel writes, which the kernel activates (hardening gaps: for example a segment chain whose cache segments alias the same physical segments, so data written through one overwrites the other's).",
            confirmed(&|c| c.about.starts_with("forged-metadata") && c.kernel.activated),
        ),
    ];
    for (title, why, list) in sections {
        let _ = writeln!(s, "## {title} ({})\n\n{why}\n", list.len());
        for c in list {
            entry(&mut s, c);
        }
    }
    let _ = writeln!(s, "## Reproducing with stock tools\n");
    let _ = writeln!(
        s,
        "Each image is rebuilt by `cargo xtask interop --keep` (kept under the run folder). With Debian's kernel {} and dm-pcache built from `linux-source-7.2` (`drivers/md/dm-pcache`, `CONFIG_DM_PCACHE=m`):\n",
        run.kernel_release
    );
    let _ = writeln!(
        s,
        "```sh\nqemu-system-x86_64 -accel tcg -M pc -cpu max -smp 1 -m 2G,slots=2,maxmem=6G \\\n  -kernel vmlinuz -initrd initrd.cpio -append console=ttyS0 -nographic \\\n  -object memory-backend-file,id=pm0,share=on,mem-path=IMAGE,size=512M \\\n  -device virtio-pmem-pci,memdev=pm0 -drive file=DISK,format=raw,if=virtio\n# in the guest:\ninsmod dm-pcache.ko\ndmsetup create pc --table \"0 $(blockdev --getsz /dev/vda) pcache /dev/pmem0 /dev/vda 4 cache_mode writeback data_crc false\"\ndmsetup status pc; dmesg | grep pcache\n```"
    );
    s
}

fn entry(s: &mut String, c: &Comparison) {
    let _ = writeln!(s, "### `{}`\n\n{}\n", c.image, c.about);
    let _ = writeln!(
        s,
        "- strict mode: `{}`{}{}",
        c.strict.outcome,
        c.strict
            .refusal
            .as_deref()
            .map(|k| format!(" (`{k}`)"))
            .unwrap_or_default(),
        c.strict
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    );
    let k = &c.kernel;
    let verdict = if !k.done {
        "no verdict (the guest did not finish this image)".to_string()
    } else if k.activated {
        match &k.status {
            Some(st) => format!(
                "activated; `dmsetup status`: seg_num {} n_segs {} segs_used {} cache_info flags {:#x} key_head {}:{} dirty_tail {}:{} key_tail {}:{}",
                st.seg_num, st.n_segs, st.segs_used, st.cache_info_flags, st.key_head.0, st.key_head.1, st.dirty_tail.0, st.dirty_tail.1, st.key_tail.0, st.key_tail.1
            ),
            None => "activated (no status line)".into(),
        }
    } else {
        format!(
            "refused: {}",
            k.error.as_deref().unwrap_or("(no dmsetup message)")
        )
    };
    let _ = writeln!(s, "- the kernel: {verdict}");
    for m in &k.messages {
        if !m.contains("taints kernel") {
            let _ = writeln!(s, "  - `{m}`");
        }
    }
    match &c.first_difference {
        Some(d) => {
            let _ = writeln!(s, "- images after: differ, first at {d}");
        }
        None => {
            let _ = writeln!(s, "- images after: identical");
        }
    }
    let _ = writeln!(s);
}
