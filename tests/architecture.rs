//! The shape of the house, checked: no module imports a module that imports it
//! back, and each module keeps off the modules ARCHITECTURE.md says it must
//! never import.
//!
//! Design choice: a small reader of ferry's own sources rather than a crate
//! (cargo-modules builds rust-analyzer, minutes on this machine). A module's
//! dependencies are the top-level modules its code names as `crate::NAME`;
//! comments are skipped. Submodules belong to their top-level module: the
//! graph is between the rooms of the house, not inside one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`None` for lib.rs, main.rs).
fn room(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Top-level modules named as `crate::NAME` in code (not in comments).
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` groups.
            if name.is_empty() && tail.starts_with('{') {
                let group = tail[1..].split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let n: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !n.is_empty() {
                        out.insert(n);
                    }
                }
            } else if !name.is_empty() {
                out.insert(name);
            }
            rest = tail;
        }
    }
    out
}

/// Room -> the rooms it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(r) = room(&src, &f) else { continue };
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(r.clone()).or_default();
        for n in named(&text) {
            if n != r && n != "VERSION" {
                deps.insert(n);
            }
        }
    }
    g
}

/// A cycle through `start`, if any (depth-first, bounded by the graph's size).
fn cycle_from(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in g.get(&at).into_iter().flatten() {
            if next == start {
                let mut c = path.clone();
                c.push(start.to_string());
                return Some(c);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let g = graph();
    assert!(g.len() >= 10, "read too few modules: {g:?}");
    let cycles: BTreeSet<Vec<String>> = g
        .keys()
        .filter_map(|m| cycle_from(&g, m))
        .map(|mut c| {
            // One form per cycle: start at its smallest name.
            c.pop();
            let i = (0..c.len()).min_by_key(|&i| &c[i]).unwrap_or(0);
            c.rotate_left(i);
            c.push(c[0].clone());
            c
        })
        .collect();
    let shown: Vec<String> = cycles.iter().map(|c| c.join(" -> ")).collect();
    assert!(shown.is_empty(), "import cycles:\n{}", shown.join("\n"));
}

/// The import rules of ARCHITECTURE.md's code map: for each module, the
/// modules it must never import (`Err`) or the only ones it may (`Ok`).
type Rule = Result<BTreeSet<String>, BTreeSet<String>>;

fn rules(map: &str) -> BTreeMap<String, Rule> {
    let ticked = |text: &str| -> BTreeSet<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(|s| s.to_string())
            .collect()
    };
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in map.lines() {
        if let Some(rest) = line.strip_prefix("- `") {
            let entry = rest.split('`').next().unwrap_or("");
            let name = entry
                .strip_suffix(".rs")
                .or_else(|| entry.strip_suffix('/'))
                .unwrap_or(entry);
            current = (!matches!(name, "lib" | "main")).then(|| name.to_string());
            if let Some(n) = &current {
                out.insert(n.clone(), Err(BTreeSet::new()));
            }
        }
        let Some(module) = &current else { continue };
        if let Some((_, never)) = line.split_once("Never imports:") {
            out.insert(module.clone(), Err(ticked(never)));
        } else if let Some((_, only)) = line.split_once("Imports only:") {
            out.insert(module.clone(), Ok(ticked(only)));
        }
    }
    out
}

/// What breaks the rules: (module, what it imports that it must not).
fn broken(g: &BTreeMap<String, BTreeSet<String>>, r: &BTreeMap<String, Rule>) -> Vec<String> {
    let mut out = Vec::new();
    for (m, deps) in g {
        match r.get(m) {
            None => out.push(format!("{m} is not in ARCHITECTURE.md's code map")),
            Some(Err(never)) => {
                for d in deps.intersection(never) {
                    out.push(format!("{m} imports {d}, which it must never import"));
                }
            }
            Some(Ok(only)) => {
                for d in deps.difference(only) {
                    out.push(format!("{m} imports {d}; it may import only {only:?}"));
                }
            }
        }
    }
    for m in r.keys() {
        if !g.contains_key(m) {
            out.push(format!("ARCHITECTURE.md maps {m}, which is not a module"));
        }
    }
    out
}

#[test]
fn each_module_keeps_the_rules_of_the_code_map() {
    let map =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let r = rules(&map);
    assert!(r.len() >= 20, "read too few rules: {r:?}");
    let b = broken(&graph(), &r);
    assert!(b.is_empty(), "{}", b.join("\n"));
}

#[test]
fn the_checker_sees_a_cycle() {
    // The check itself must be able to fail.
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(cycle_from(&g, "a").is_some());
    assert_eq!(
        named("use crate::{config, store::X};\n// crate::daemon\nlet x = crate::chunk::y;"),
        BTreeSet::from(["config".into(), "store".into(), "chunk".into()])
    );
}

#[test]
fn the_rules_check_can_fail() {
    let r = rules(
        "- `a.rs`: owns a.\n  Imports only: `b`.\n- `c/`: owns c.\n  Never imports: `a`, `b`.\n- `main.rs`: x\n",
    );
    assert_eq!(r["a"], Ok(BTreeSet::from(["b".to_string()])));
    assert_eq!(
        r["c"],
        Err(BTreeSet::from(["a".to_string(), "b".to_string()]))
    );
    assert!(!r.contains_key("main"));
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("d".to_string(), BTreeSet::new());
    let b = broken(&g, &r);
    assert_eq!(b.len(), 3, "{b:?}");
}
