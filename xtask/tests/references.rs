//! Every reference in the repository points inside it: no link to a file
//! that is not there (the format document used to live outside the
//! repository), and every `§` names a section that docs/format.md has.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Text files of the repository (not build outputs, run results or git's own).
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "results" | "fixtures") {
                files(&p, out);
            }
        } else if [".rs", ".md", ".json", ".toml", ".sh", ".yml"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            out.push(p);
        }
    }
}

fn all() -> Vec<(PathBuf, String)> {
    let mut v = Vec::new();
    files(&root(), &mut v);
    v.into_iter()
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap_or_default();
            (p, t)
        })
        .collect()
}

/// The section numbers docs/format.md has (`## 5.` / `### 5.10`).
fn sections() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/format.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').split_whitespace().next())
        .map(|n| n.trim_end_matches('.').to_string())
        .filter(|n| n.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect()
}

#[test]
fn no_reference_leaves_the_repository() {
    let mut bad = Vec::new();
    for (p, text) in all() {
        if p.ends_with("xtask/tests/references.rs") {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            if ["shared/docs", "pcache-format.md", "kvm-notes"]
                .iter()
                .any(|w| line.contains(w))
            {
                bad.push(format!("{}:{}: {line}", p.display(), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "references outside the repository:\n{}",
        bad.join("\n")
    );
}

#[test]
fn section_references_name_sections_of_the_format_document() {
    let have = sections();
    assert!(have.contains(&"5.10".to_string()), "{have:?}");
    let mut bad = Vec::new();
    for (p, text) in all() {
        if p.ends_with("xtask/tests/references.rs") {
            continue;
        }
        let in_doc = p.ends_with("docs/format.md");
        for (i, line) in text.lines().enumerate() {
            for (at, _) in line.match_indices('§') {
                let num: String = line[at + '§'.len_utf8()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let num = num.trim_end_matches('.');
                if num.is_empty() {
                    continue; // `§N` written as a placeholder, not a reference
                }
                if !have.iter().any(|h| h == num) {
                    bad.push(format!(
                        "{}:{}: §{num} is not a section",
                        p.display(),
                        i + 1
                    ));
                }
                // Outside the document, a `§` names the document it is in.
                if !in_doc && !line.contains("format.md") {
                    bad.push(format!(
                        "{}:{}: §{num} without docs/format.md",
                        p.display(),
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn markdown_links_resolve() {
    let mut bad = Vec::new();
    for (p, text) in all() {
        if p.extension().is_none_or(|x| x != "md") {
            continue;
        }
        let dir = p.parent().unwrap();
        for (i, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                let after = &rest[at + 2..];
                let end = after.find(')').unwrap_or(after.len());
                let target = after[..end].split('#').next().unwrap_or("");
                if !target.is_empty()
                    && !target.contains("://")
                    && !target.starts_with("mailto:")
                    && !dir.join(target).exists()
                {
                    bad.push(format!("{}:{}: {target}", p.display(), i + 1));
                }
                rest = &after[end.min(after.len())..];
            }
        }
    }
    assert!(
        bad.is_empty(),
        "links to missing files:\n{}",
        bad.join("\n")
    );
}
