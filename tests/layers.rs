//! The layering of docs/architecture.md, checked on the source: each layer names only the
//! layers before it, only the store names sled, and the domain names no tokio or tonic.
#![allow(clippy::expect_used)]

use std::path::Path;

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            out.push((path.display().to_string(), text));
        }
    }
    out
}

/// The code of a file without its comments (a doc comment may mention any layer).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn each_layer_names_only_the_layers_before_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // Layer, and what it must not name.
    let rules: &[(&str, &[&str])] = &[
        (
            "domain",
            &[
                "crate::store",
                "crate::engine",
                "crate::read",
                "crate::api",
                "crate::server",
                "crate::proto",
                "sled::",
                "tokio::",
                "tonic::",
            ],
        ),
        (
            "store",
            &[
                "crate::engine",
                "crate::read",
                "crate::api",
                "crate::server",
                "crate::proto",
                "tonic::",
                "tokio::",
            ],
        ),
        (
            "engine",
            &[
                "crate::read",
                "crate::api",
                "crate::server",
                "crate::proto",
                "sled::",
                "tonic::",
            ],
        ),
        (
            "read",
            &["crate::api", "crate::server", "crate::proto", "sled::", "tonic::"],
        ),
        (
            "deliver",
            &["crate::api", "crate::server", "crate::proto", "sled::", "tonic::"],
        ),
        (
            "cli",
            &[
                "crate::store",
                "crate::engine",
                "crate::read",
                "crate::deliver",
                "crate::api",
                "sled::",
            ],
        ),
        ("api", &["crate::server", "sled::"]),
        (
            "access",
            &[
                "crate::store",
                "crate::engine",
                "crate::read",
                "crate::api",
                "crate::server",
                "crate::proto",
                "sled::",
                "tonic::",
            ],
        ),
    ];
    let mut checked = 0;
    let mut violations = Vec::new();
    for (layer, forbidden) in rules {
        for (path, text) in sources(&src.join(layer)) {
            let code = code(&text);
            for name in *forbidden {
                if code.contains(name) {
                    violations.push(format!("{path} names {name}"));
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} files checked");
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}
