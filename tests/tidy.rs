//! Tidy checks, in the manner of rust-analyzer's `tidy`: rules about the source tree itself,
//! run by `cargo test` so that they cannot drift. Standard library only: the checks read
//! files and use none of the root package's dev-dependencies.
//!
//! - Every repository path `ARCHITECTURE.md` names in backticks exists: a word with a `/` or
//!   a `.rs`, `.md`, `.toml`, `.sh` or `.json` name (not a URL path such as `/metrics`, nor
//!   `../` outside the repository), found from the root or from any directory of the
//!   repository (`io/worker.rs` names `relay/src/io/worker.rs`).
//! - Every source file of `relay/src/core/` opens with a `//!` comment and has at most
//!   `CORE_FILE_LINES_MAX` lines.
//! - No two modules (files) of `relay/src` import each other. A file imports another when one
//!   of its paths (`use crate::..`, `use super::..`, `use self::..`, a path through a child
//!   module's name, or `crate::a::b` inside code) resolves to an item of that file. A child
//!   using its parent through `super::` imports the parent; the parent declaring `mod child;`
//!   does not import the child, but `pub use self::child::X` does.
//!
//! Each check lists every offender, with where it is, before it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A file of the relay's sans-IO core longer than this is doing more than one job.
const CORE_FILE_LINES_MAX: usize = 600;

/// Pairs of `relay/src` files (relative to it) that import each other and are tolerated for
/// now, each with what removes it. Only shrink it: an entry that no longer applies fails the
/// test, so that a fixed pair cannot come back unnoticed.
const MUTUAL_IMPORTS_ALLOWED: &[(&str, &str)] = &[];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------
// (a) Paths named in ARCHITECTURE.md

#[test]
fn architecture_names_only_paths_that_exist() {
    let root = repo();
    let text = read(&root.join("ARCHITECTURE.md"));
    let entries = repo_entries(&root);
    let mut missing = Vec::new();
    let mut checked = 0;
    for (line, span) in code_spans(&text) {
        if !looks_like_repo_path(&span) {
            continue;
        }
        checked += 1;
        if !path_exists(&root, &entries, &span) {
            missing.push(format!("ARCHITECTURE.md:{line}: `{span}`"));
        }
    }
    assert!(
        checked > 20,
        "ARCHITECTURE.md names only {checked} paths: is the code map still there?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist (a path is relative to the repository, \
         or to any directory of it, e.g. `io/worker.rs` for `relay/src/io/worker.rs`):\n  {}",
        missing.join("\n  ")
    );
}

/// The inline code spans of a Markdown text, with the line each starts on; fenced code blocks
/// are skipped.
fn code_spans(text: &str) -> Vec<(usize, String)> {
    let mut spans = Vec::new();
    let mut in_fence = false;
    let mut open: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if open.is_none() && line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        for c in line.chars() {
            match (&mut open, c) {
                (None, '`') => open = Some((number, String::new())),
                (Some(_), '`') => spans.extend(open.take()),
                (Some((_, span)), c) => span.push(c),
                (None, _) => {}
            }
        }
        if let Some((_, span)) = &mut open {
            span.push('\n');
        }
    }
    spans
}

/// A path into this repository: one word, relative (not a URL path such as `/metrics`, nor
/// outside the repository such as `../shared/DESIGN.md`), with a directory separator or the
/// extension of a file kind the repository holds.
fn looks_like_repo_path(span: &str) -> bool {
    const EXTENSIONS: [&str; 5] = [".rs", ".md", ".toml", ".sh", ".json"];
    !span.is_empty()
        && !span.contains(char::is_whitespace)
        && !span.starts_with('/')
        && !span.starts_with("../")
        && !span.contains("://")
        && (span.contains('/') || EXTENSIONS.iter().any(|e| span.ends_with(e)))
}

/// Every file and directory of the repository, relative and with `/` separators (build
/// output and hidden directories left out).
fn repo_entries(root: &Path) -> Vec<String> {
    let mut entries = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "target" {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .expect("inside the repository")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if path.is_dir() {
                pending.push(path);
            }
            entries.push(relative);
        }
    }
    entries
}

/// Whether `span` names a file or directory, from the repository's root or from any of its
/// directories.
fn path_exists(root: &Path, entries: &[String], span: &str) -> bool {
    let wanted = span.trim_start_matches("./").trim_end_matches('/');
    let is_dir = span.ends_with('/');
    let kind_fits = |relative: &str| !is_dir || root.join(relative).is_dir();
    entries.iter().any(|relative| {
        (relative == wanted || relative.ends_with(&format!("/{wanted}"))) && kind_fits(relative)
    })
}

// ------------------------------------------------------------------------------------------
// (b) The shape of relay/src/core

#[test]
fn core_files_are_short_and_say_what_they_are() {
    let core = repo().join("relay/src/core");
    let mut files = Vec::new();
    rust_files(&core, &mut files);
    assert!(
        files.len() > 10,
        "relay/src/core has only {} files",
        files.len()
    );
    let mut offenders = Vec::new();
    for file in &files {
        let text = read(file);
        let shown = file.strip_prefix(repo()).unwrap_or(file).display();
        if !text.starts_with("//!") {
            offenders.push(format!("{shown}: does not open with a `//!` comment"));
        }
        let lines = text.lines().count();
        if lines > CORE_FILE_LINES_MAX {
            offenders.push(format!(
                "{shown}: {lines} lines, more than {CORE_FILE_LINES_MAX}: split it by job"
            ));
        }
    }
    assert!(
        offenders.is_empty(),
        "relay/src/core:\n  {}",
        offenders.join("\n  ")
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

// ------------------------------------------------------------------------------------------
// (c) No two modules of relay/src import each other

#[test]
fn no_two_relay_modules_import_each_other() {
    let src = repo().join("relay/src");
    let graph = ModuleGraph::build(&src, &["lib.rs", "main.rs"]);
    assert!(
        graph.files.len() > 30,
        "found only {} modules under relay/src: is `mod` parsing broken?",
        graph.files.len()
    );
    let mut unexplained = Vec::new();
    let mut allowed_seen = BTreeSet::new();
    for (a, b) in graph.mutual_pairs() {
        let allowed = MUTUAL_IMPORTS_ALLOWED
            .iter()
            .position(|(x, y)| (*x == a && *y == b) || (*x == b && *y == a));
        if let Some(index) = allowed {
            allowed_seen.insert(index);
            continue;
        }
        unexplained.push(format!(
            "{a} and {b} import each other:\n      {a}:{}\n      {b}:{}",
            graph.first_import(&a, &b),
            graph.first_import(&b, &a)
        ));
    }
    assert!(
        unexplained.is_empty(),
        "modules of relay/src that import each other (move what both need into a module \
         neither imports, or let only one side know the other):\n  {}",
        unexplained.join("\n  ")
    );
    let stale: Vec<String> = MUTUAL_IMPORTS_ALLOWED
        .iter()
        .enumerate()
        .filter(|(index, _)| !allowed_seen.contains(index))
        .map(|(_, (a, b))| format!("{a} <-> {b}"))
        .collect();
    assert!(
        stale.is_empty(),
        "MUTUAL_IMPORTS_ALLOWED lists pairs that no longer import each other; remove them:\n  {}",
        stale.join("\n  ")
    );
}

/// The files of one source directory as modules, and which file's paths lead into which.
struct ModuleGraph {
    /// File (relative to the source directory) -> (crate root, module path).
    files: BTreeMap<String, (String, Vec<String>)>,
    /// (importing file, imported file) -> the first importing line: "number: text".
    edges: BTreeMap<(String, String), String>,
}

impl ModuleGraph {
    /// Follows the `mod name;` declarations from each crate root (a library and a binary
    /// are separate crates: `crate::` means a different root in each).
    fn build(src: &Path, roots: &[&str]) -> ModuleGraph {
        let mut files = BTreeMap::new();
        let mut by_path = BTreeMap::new();
        let mut parsed = Vec::new();
        for root in roots {
            let mut pending = vec![(root.to_string(), Vec::<String>::new())];
            while let Some((file, path)) = pending.pop() {
                let source = read(&src.join(&file));
                let lexed = lex(&source);
                let dir = module_dir(&file);
                for (inline, child) in child_declarations(&lexed) {
                    let mut child_dir = dir.clone();
                    child_dir.extend(inline.iter().cloned());
                    let base = child_dir.join("/");
                    let base = if base.is_empty() {
                        base
                    } else {
                        format!("{base}/")
                    };
                    let flat = format!("{base}{child}.rs");
                    let nested = format!("{base}{child}/mod.rs");
                    let child_file = if src.join(&flat).is_file() {
                        flat
                    } else if src.join(&nested).is_file() {
                        nested
                    } else {
                        panic!("{file}: `mod {child};` has neither {flat} nor {nested}");
                    };
                    let mut child_path = path.clone();
                    child_path.extend(inline);
                    child_path.push(child);
                    pending.push((child_file, child_path));
                }
                files.insert(file.clone(), (root.to_string(), path.clone()));
                by_path.insert((root.to_string(), path.clone()), file.clone());
                parsed.push((file, root.to_string(), path, source, lexed));
            }
        }
        let mut edges = BTreeMap::new();
        for (file, root, path, source, lexed) in &parsed {
            for (line, target) in referenced_paths(lexed, path) {
                let Some(to) = longest_module(&by_path, root, &target) else {
                    continue;
                };
                if to != file {
                    let text = source.lines().nth(line - 1).unwrap_or("").trim();
                    edges
                        .entry((file.clone(), to.clone()))
                        .or_insert_with(|| format!("{line}: {text}"));
                }
            }
        }
        ModuleGraph { files, edges }
    }

    /// Every pair of files that import each other, each pair once.
    fn mutual_pairs(&self) -> Vec<(String, String)> {
        self.edges
            .keys()
            .filter(|(a, b)| a < b && self.edges.contains_key(&(b.clone(), a.clone())))
            .cloned()
            .collect()
    }

    fn first_import(&self, from: &str, to: &str) -> &str {
        self.edges
            .get(&(from.to_string(), to.to_string()))
            .map_or("?", String::as_str)
    }
}

/// The directory (relative to the source directory) where a file's child modules live.
fn module_dir(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.split('/').map(str::to_string).collect();
    let name = parts.pop().unwrap_or_default();
    if !matches!(name.as_str(), "lib.rs" | "main.rs" | "mod.rs") {
        parts.push(name.trim_end_matches(".rs").to_string());
    }
    parts
}

/// The file whose module is the longest prefix of `target` in crate `root`.
fn longest_module<'a>(
    by_path: &'a BTreeMap<(String, Vec<String>), String>,
    root: &str,
    target: &[String],
) -> Option<&'a String> {
    (0..=target.len())
        .rev()
        .find_map(|len| by_path.get(&(root.to_string(), target[..len].to_vec())))
}

/// A token of Rust source with comments and literals already gone.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Tokens with their line numbers. Comments, strings and character literals are dropped (a
/// doc comment naming `crate::control` imports nothing); lifetimes are kept as punctuation
/// and an identifier.
fn lex(source: &str) -> Vec<(usize, Token)> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' || ((c == 'b' || c == 'c') && at(i + 1) == '"') {
            i += if c == '"' { 1 } else { 2 };
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (c == 'r' || ((c == 'b' || c == 'c') && at(i + 1) == 'r'))
            && raw_string_start(&chars, i).is_some()
        {
            let (hashes, body) = raw_string_start(&chars, i).unwrap_or_default();
            i = body;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}', '"') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                tokens.push((line, Token::Punct('\'')));
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let mut word: String = chars[start..i].iter().collect();
            if word == "r" && at(i) == '#' {
                // A raw identifier: r#type.
                i += 1;
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                word = chars[start..i].iter().collect();
            }
            tokens.push((line, Token::Ident(word)));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((line, Token::Punct('0')));
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push((line, Token::PathSep));
            i += 2;
        } else {
            tokens.push((line, Token::Punct(c)));
            i += 1;
        }
    }
    tokens
}

/// At `r"`, `r#"`, `br##"`…: the number of `#`s and where the string's body starts.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if chars.get(j) != Some(&'r') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while chars.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (chars.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

fn ident(tokens: &[(usize, Token)], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some((_, Token::Ident(word))) => Some(word),
        _ => None,
    }
}

fn is(tokens: &[(usize, Token)], i: usize, want: &Token) -> bool {
    tokens.get(i).is_some_and(|(_, t)| t == want)
}

/// Walks a file's tokens, calling `visit` at each with the names of the inline modules
/// (`mod tests { .. }`) it is inside.
fn walk(tokens: &[(usize, Token)], mut visit: impl FnMut(usize, &[String]) -> usize) {
    let mut depth = 0usize;
    // (name, depth inside its braces)
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_inline: Option<String> = None;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].1 {
            Token::Punct('{') => {
                depth += 1;
                if let Some(name) = pending_inline.take() {
                    inline.push((name, depth));
                }
                i += 1;
                continue;
            }
            Token::Punct('}') => {
                while inline.last().is_some_and(|(_, d)| *d >= depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
                continue;
            }
            Token::Ident(word) if word == "mod" && is(tokens, i + 2, &Token::Punct('{')) => {
                pending_inline = ident(tokens, i + 1).map(str::to_string);
            }
            _ => {}
        }
        let names: Vec<String> = inline.iter().map(|(n, _)| n.clone()).collect();
        i = visit(i, &names).max(i + 1);
    }
}

/// `mod name;` declarations: (inline modules they are inside, name).
fn child_declarations(tokens: &[(usize, Token)]) -> Vec<(Vec<String>, String)> {
    let mut children = Vec::new();
    walk(tokens, |i, inline| {
        if ident(tokens, i) == Some("mod")
            && is(tokens, i + 2, &Token::Punct(';'))
            && let Some(name) = ident(tokens, i + 1)
        {
            children.push((inline.to_vec(), name.to_string()));
        }
        i + 1
    });
    children
}

/// Every module path a file refers to, absolute within its crate, with its line: the paths
/// of its `use` trees and the `crate::`/`super::`/`self::`/child-module paths in its code.
fn referenced_paths(tokens: &[(usize, Token)], module: &[String]) -> Vec<(usize, Vec<String>)> {
    let children: BTreeSet<String> = child_declarations(tokens)
        .into_iter()
        .filter(|(inline, _)| inline.is_empty())
        .map(|(_, name)| name)
        .collect();
    let mut found = Vec::new();
    walk(tokens, |i, inline| {
        let mut here = module.to_vec();
        here.extend(inline.iter().cloned());
        let line = tokens[i].0;
        if ident(tokens, i) == Some("use") {
            let mut j = i + 1;
            let mut paths = Vec::new();
            use_tree(tokens, &mut j, Vec::new(), &mut paths);
            for path in paths {
                if let Some(absolute) = resolve(&here, &children, inline.is_empty(), &path) {
                    found.push((line, absolute));
                }
            }
            return j;
        }
        let after_sep = i > 0 && matches!(tokens[i - 1].1, Token::PathSep | Token::Punct('.'));
        if !after_sep && is(tokens, i + 1, &Token::PathSep) && ident(tokens, i).is_some() {
            let mut path = Vec::new();
            let mut j = i;
            while let Some(word) = ident(tokens, j) {
                path.push(word.to_string());
                if !is(tokens, j + 1, &Token::PathSep) {
                    break;
                }
                j += 2;
            }
            if let Some(absolute) = resolve(&here, &children, inline.is_empty(), &path) {
                found.push((line, absolute));
            }
            return j + 1;
        }
        i + 1
    });
    found
}

/// Expands a `use` tree from `*j` to its end (`;`), appending every path it names to `out`
/// (`a::{b, c::{self, d}}` gives `a::b`, `a::c`, `a::c::d`); renames and globs name their
/// path.
fn use_tree(
    tokens: &[(usize, Token)],
    j: &mut usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) {
    let mut path = prefix;
    loop {
        match tokens.get(*j).map(|(_, t)| t) {
            Some(Token::Ident(word)) if word == "self" && !path.is_empty() => *j += 1,
            Some(Token::Ident(word)) if word == "as" => {
                // `as name`: the path is what counts.
                *j += 2;
            }
            Some(Token::Ident(word)) => {
                path.push(word.clone());
                *j += 1;
            }
            Some(Token::PathSep) => *j += 1,
            Some(Token::Punct('*')) => *j += 1,
            Some(Token::Punct('{')) => {
                *j += 1;
                loop {
                    use_tree(tokens, j, path.clone(), out);
                    match tokens.get(*j).map(|(_, t)| t) {
                        Some(Token::Punct(',')) => *j += 1,
                        Some(Token::Punct('}')) => {
                            *j += 1;
                            break;
                        }
                        _ => break,
                    }
                    if is(tokens, *j, &Token::Punct('}')) {
                        *j += 1;
                        break;
                    }
                }
                return;
            }
            Some(Token::Punct(',' | '}')) => {
                out.push(path);
                return;
            }
            Some(Token::Punct(';')) => {
                out.push(path);
                *j += 1;
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// `path` as written in module `here` made absolute within the crate; `None` for paths into
/// other crates (`std::..`, `codec::..`) and for names that are not modules of this one.
fn resolve(
    here: &[String],
    children: &BTreeSet<String>,
    at_file_level: bool,
    path: &[String],
) -> Option<Vec<String>> {
    let first = path.first()?;
    let mut absolute;
    let rest;
    match first.as_str() {
        "crate" => {
            absolute = Vec::new();
            rest = &path[1..];
        }
        "self" => {
            absolute = here.to_vec();
            rest = &path[1..];
        }
        "super" => {
            absolute = here.to_vec();
            let supers = path.iter().take_while(|s| *s == "super").count();
            for _ in 0..supers {
                absolute.pop()?;
            }
            rest = &path[supers..];
        }
        // A child module's name is in scope in its parent.
        name if at_file_level && children.contains(name) => {
            absolute = here.to_vec();
            rest = path;
        }
        _ => return None,
    }
    absolute.extend(rest.iter().cloned());
    Some(absolute)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
