//! GRUB 2's `grub.cfg`: enough of its shell-like language to find the default entry the way
//! GRUB would, without running anything.
//!
//! Understood: words with `'...'`, `"..."`, `\` escapes and `$var`/`${var}` expansion (unquoted
//! expansions split on blanks, so an empty `$menuentry_id_option` vanishes); `#` comments; `;`
//! and newlines; `set NAME=VALUE`, `NAME=VALUE`, `unset`; `load_env` (reads `grubenv` next to
//! `grub.cfg`); `search --fs-uuid|--label|--file [--set=VAR] KEY`; `if`/`elif`/`else`/`fi` with
//! `[ ... ]` / `test` conditions (`-n -z = == != -eq -ne -lt -le -gt -ge -e -f -s`, `!`);
//! `function` definitions and calls; `menuentry` and `submenu` (with `--class`, `--id`,
//! `--users`, `--hotkey`, `--unrestricted`); and inside the chosen entry `linux`/`linux16`/
//! `linuxefi` and `initrd`/`initrd16`/`initrdefi`. Every other command is ignored (`insmod`,
//! `terminal_output`, `echo`, `load_video`, ...) and counts as failed in a condition. Loops
//! (`for`/`while`/`until`) are parsed and skipped. The default is `$default` as GRUB reads it:
//! a number, a title or an `--id`, with `>` separating submenu levels, and `saved` meaning
//! `$saved_entry`; an unknown default means entry 0, as in GRUB.
//!
//! Written by hand: no crate on crates.io parses GRUB's script language (the GRUB sources are
//! the reference, `grub-core/script/`).

use std::collections::HashMap;

/// A file as GRUB names it: `(DEVICE)/path`, or a path on `$root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    /// GRUB device name without parentheses (`hd0,gpt2`), or `None` when `$root` was unset.
    pub device: Option<String>,
    pub path: String,
}

/// What the host (the disk being read) answers for the script.
pub trait Host {
    /// `search`: the GRUB device holding a filesystem with that UUID / label / file.
    fn search(&self, kind: SearchKind, key: &str) -> Option<String>;
    /// The content of a file, for `load_env` and `[ -e ... ]`.
    fn read(&self, file: &FileRef) -> Option<Vec<u8>>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchKind {
    FsUuid,
    Label,
    File,
}

/// The entry GRUB would boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Titles from the top menu down, joined by `>`.
    pub title: String,
    pub kernel: FileRef,
    pub initrds: Vec<FileRef>,
    pub args: String,
}

/// Limits against hostile configs.
const MAX_DEPTH: usize = 64;
const MAX_STEPS: usize = 200_000;
const MAX_VALUE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Word {
    parts: Vec<Part>,
    quoted: bool,
}

impl Word {
    fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Lit(s)] if !self.quoted => Some(s),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Word(Word),
    Sep,
    Open,
    Close,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied();
    while let Some(c) = at(i) {
        match c {
            ' ' | '\t' | '\r' => i += 1,
            '\n' | ';' => {
                out.push(Tok::Sep);
                i += 1;
            }
            '#' => {
                while at(i).is_some_and(|c| c != '\n') {
                    i += 1;
                }
            }
            '\\' if at(i + 1) == Some('\n') => i += 2,
            _ => {
                let mut parts: Vec<Part> = Vec::new();
                let mut quoted = false;
                let mut lit = String::new();
                let flush = |lit: &mut String, parts: &mut Vec<Part>| {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(lit)));
                    }
                };
                while let Some(c) = at(i) {
                    match c {
                        ' ' | '\t' | '\r' | '\n' | ';' => break,
                        '\\' => {
                            match at(i + 1) {
                                Some('\n') => {}
                                Some(n) => lit.push(n),
                                None => {}
                            }
                            i += 2;
                        }
                        '\'' => {
                            quoted = true;
                            i += 1;
                            loop {
                                match at(i) {
                                    None => return Err("unterminated ' quote".into()),
                                    Some('\'') => break,
                                    Some(ch) => lit.push(ch),
                                }
                                i += 1;
                            }
                            i += 1;
                        }
                        '"' => {
                            quoted = true;
                            i += 1;
                            loop {
                                match at(i) {
                                    None => return Err("unterminated \" quote".into()),
                                    Some('"') => break,
                                    Some('\\') => {
                                        match at(i + 1) {
                                            Some(n @ ('\\' | '"' | '$')) => lit.push(n),
                                            Some('\n') => {}
                                            Some(n) => {
                                                lit.push('\\');
                                                lit.push(n);
                                            }
                                            None => {}
                                        }
                                        i += 2;
                                    }
                                    Some('$') => {
                                        let (name, next) = var_name(&chars, i);
                                        match name {
                                            Some(n) => {
                                                flush(&mut lit, &mut parts);
                                                parts.push(Part::Var(n));
                                            }
                                            None => lit.push('$'),
                                        }
                                        i = next;
                                    }
                                    Some(ch) => {
                                        lit.push(ch);
                                        i += 1;
                                    }
                                }
                            }
                            i += 1;
                        }
                        '$' => {
                            let (name, next) = var_name(&chars, i);
                            match name {
                                Some(n) => {
                                    flush(&mut lit, &mut parts);
                                    parts.push(Part::Var(n));
                                }
                                None => lit.push('$'),
                            }
                            i = next;
                        }
                        ch => {
                            lit.push(ch);
                            i += 1;
                        }
                    }
                }
                flush(&mut lit, &mut parts);
                let w = Word { parts, quoted };
                match w.literal() {
                    Some("{") => out.push(Tok::Open),
                    Some("}") => out.push(Tok::Close),
                    _ => out.push(Tok::Word(w)),
                }
            }
        }
    }
    Ok(out)
}

/// The variable name after the `$` at `i`, and the index after it.
fn var_name(chars: &[char], i: usize) -> (Option<String>, usize) {
    let mut j = i + 1;
    if chars.get(j) == Some(&'{') {
        let mut name = String::new();
        j += 1;
        while let Some(&c) = chars.get(j) {
            if c == '}' {
                return (Some(name), j + 1);
            }
            name.push(c);
            j += 1;
        }
        return (None, i + 1);
    }
    let mut name = String::new();
    while let Some(&c) = chars.get(j) {
        if is_name_char(c) || (name.is_empty() && (c == '?' || c == '#')) {
            name.push(c);
            j += 1;
        } else {
            break;
        }
    }
    if name.is_empty() {
        (None, i + 1)
    } else {
        (Some(name), j)
    }
}

#[derive(Clone, Debug)]
enum Stmt {
    Cmd(Vec<Word>),
    Block {
        head: Vec<Word>,
        body: Vec<Stmt>,
    },
    If {
        arms: Vec<(Vec<Stmt>, Vec<Stmt>)>,
        otherwise: Vec<Stmt>,
    },
    Loop,
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// A command split off after a leading keyword (`then cmd`), read next.
    pending: Option<Vec<Word>>,
}

enum Item {
    Cmd(Vec<Word>),
    Open,
    Close,
}

const KEYWORDS_WITH_TAIL: [&str; 3] = ["then", "else", "do"];

impl Parser {
    fn next_item(&mut self) -> Option<Item> {
        if let Some(p) = self.pending.take() {
            return Some(Item::Cmd(p));
        }
        loop {
            match self.toks.get(self.pos)? {
                Tok::Sep => self.pos += 1,
                Tok::Open => {
                    self.pos += 1;
                    return Some(Item::Open);
                }
                Tok::Close => {
                    self.pos += 1;
                    return Some(Item::Close);
                }
                Tok::Word(_) => break,
            }
        }
        let mut words = Vec::new();
        while let Some(Tok::Word(w)) = self.toks.get(self.pos) {
            words.push(w.clone());
            self.pos += 1;
        }
        if words.len() > 1
            && words
                .first()
                .and_then(Word::literal)
                .is_some_and(|k| KEYWORDS_WITH_TAIL.contains(&k))
        {
            let tail = words.split_off(1);
            self.pending = Some(tail);
        }
        Some(Item::Cmd(words))
    }

    fn peek_is_open(&self) -> bool {
        self.pending.is_none() && matches!(self.toks.get(self.pos), Some(Tok::Open))
    }

    /// Statements up to (not including) a command starting with one of `stops`, or a `}` when
    /// `in_braces`. Returns the stop keyword's command (`None` at `}` or the end).
    fn seq(
        &mut self,
        stops: &[&str],
        in_braces: bool,
        depth: usize,
    ) -> Result<(Vec<Stmt>, Option<Vec<Word>>), String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        let mut out = Vec::new();
        while let Some(item) = self.next_item() {
            let words = match item {
                Item::Close if in_braces => return Ok((out, None)),
                Item::Close => return Err("unexpected }".into()),
                Item::Open => {
                    let (body, _) = self.seq(&[], true, depth + 1)?;
                    out.push(Stmt::Block {
                        head: Vec::new(),
                        body,
                    });
                    continue;
                }
                Item::Cmd(w) => w,
            };
            let first = words.first().and_then(Word::literal).unwrap_or("");
            if stops.contains(&first) {
                return Ok((out, Some(words)));
            }
            match first {
                "if" => {
                    let mut arms = Vec::new();
                    let mut otherwise = Vec::new();
                    let mut cond_head = words.get(1..).unwrap_or(&[]).to_vec();
                    loop {
                        let (mut cond, stop) = self.seq(&["then"], false, depth + 1)?;
                        if !cond_head.is_empty() {
                            cond.insert(0, Stmt::Cmd(cond_head));
                        }
                        if stop.is_none() {
                            return Err("if without then".into());
                        }
                        let (body, stop) = self.seq(&["elif", "else", "fi"], false, depth + 1)?;
                        arms.push((cond, body));
                        let stop = stop.ok_or("if without fi")?;
                        match stop.first().and_then(Word::literal) {
                            Some("elif") => {
                                cond_head = stop.get(1..).unwrap_or(&[]).to_vec();
                            }
                            Some("else") => {
                                let (body, stop) = self.seq(&["fi"], false, depth + 1)?;
                                stop.ok_or("if without fi")?;
                                otherwise = body;
                                break;
                            }
                            _ => break,
                        }
                    }
                    out.push(Stmt::If { arms, otherwise });
                }
                "for" | "while" | "until" => {
                    let (_, stop) = self.seq(&["do"], false, depth + 1)?;
                    stop.ok_or("loop without do")?;
                    let (_, stop) = self.seq(&["done"], false, depth + 1)?;
                    stop.ok_or("loop without done")?;
                    out.push(Stmt::Loop);
                }
                _ => {
                    if self.peek_is_open() {
                        self.pos += 1;
                        let (body, _) = self.seq(&[], true, depth + 1)?;
                        out.push(Stmt::Block { head: words, body });
                    } else {
                        out.push(Stmt::Cmd(words));
                    }
                }
            }
        }
        if in_braces {
            return Err("missing }".into());
        }
        Ok((out, None))
    }
}

fn parse(src: &str) -> Result<Vec<Stmt>, String> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
        pending: None,
    };
    let (stmts, stop) = p.seq(&[], false, 0)?;
    if let Some(w) = stop {
        return Err(format!(
            "unexpected {}",
            w.first().and_then(Word::literal).unwrap_or("word")
        ));
    }
    Ok(stmts)
}

#[derive(Clone, Debug)]
enum MenuItem {
    Entry {
        title: String,
        id: Option<String>,
        body: Vec<Stmt>,
    },
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<MenuItem>,
        env: HashMap<String, String>,
    },
}

impl MenuItem {
    fn matches(&self, key: &str) -> bool {
        let (title, id) = match self {
            MenuItem::Entry { title, id, .. } | MenuItem::Submenu { title, id, .. } => (title, id),
        };
        title == key || id.as_deref() == Some(key)
    }
}

struct Interp<'h> {
    host: &'h dyn Host,
    env: HashMap<String, String>,
    functions: HashMap<String, Vec<Stmt>>,
    menu: Vec<MenuItem>,
    steps: usize,
    kernel: Option<(FileRef, String)>,
    initrds: Vec<FileRef>,
}

impl Interp<'_> {
    fn expand(&self, words: &[Word]) -> Vec<String> {
        let mut out = Vec::new();
        for w in words {
            let mut s = String::new();
            for p in &w.parts {
                match p {
                    Part::Lit(l) => s.push_str(l),
                    Part::Var(v) => s.push_str(self.env.get(v).map(String::as_str).unwrap_or("")),
                }
                if s.len() > MAX_VALUE {
                    s.truncate(MAX_VALUE);
                }
            }
            let has_var = w.parts.iter().any(|p| matches!(p, Part::Var(_)));
            if !w.quoted && has_var {
                out.extend(s.split_whitespace().map(String::from));
            } else {
                out.push(s);
            }
        }
        out
    }

    fn file(&self, word: &str) -> FileRef {
        if let Some(rest) = word.strip_prefix('(')
            && let Some((dev, path)) = rest.split_once(')')
        {
            return FileRef {
                device: Some(dev.to_string()),
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
            };
        }
        let root = self
            .env
            .get("root")
            .map(|r| r.trim_start_matches('(').trim_end_matches(')').to_string())
            .filter(|r| !r.is_empty());
        FileRef {
            device: root,
            path: word.to_string(),
        }
    }

    fn run(&mut self, stmts: &[Stmt], depth: usize) -> Result<bool, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        let mut status = true;
        for s in stmts {
            self.steps += 1;
            if self.steps > MAX_STEPS {
                return Err("script runs too long".into());
            }
            status = match s {
                Stmt::Cmd(words) => {
                    let args = self.expand(words);
                    self.command(&args, depth)?
                }
                Stmt::Block { head, body } => {
                    let args = self.expand(head);
                    self.block(&args, body, depth)?;
                    true
                }
                Stmt::If { arms, otherwise } => {
                    let mut taken = None;
                    for (cond, body) in arms {
                        if self.run(cond, depth + 1)? {
                            taken = Some(body);
                            break;
                        }
                    }
                    self.run(taken.unwrap_or(otherwise), depth + 1)?
                }
                Stmt::Loop => true,
            };
        }
        Ok(status)
    }

    fn block(&mut self, args: &[String], body: &[Stmt], depth: usize) -> Result<(), String> {
        let Some(cmd) = args.first() else {
            self.run(body, depth + 1)?;
            return Ok(());
        };
        match cmd.as_str() {
            "function" => {
                if let Some(name) = args.get(1) {
                    self.functions.insert(name.clone(), body.to_vec());
                }
            }
            "menuentry" | "submenu" => {
                let (title, id) = menu_title(args.get(1..).unwrap_or(&[]));
                if cmd == "menuentry" {
                    self.menu.push(MenuItem::Entry {
                        title,
                        id,
                        body: body.to_vec(),
                    });
                } else {
                    let saved = std::mem::take(&mut self.menu);
                    let env = self.env.clone();
                    let r = self.run(body, depth + 1);
                    let items = std::mem::replace(&mut self.menu, saved);
                    let sub_env = std::mem::replace(&mut self.env, env);
                    r?;
                    self.menu.push(MenuItem::Submenu {
                        title,
                        id,
                        items,
                        env: sub_env,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn set(&mut self, name: &str, value: &str) {
        if !name.is_empty() && name.chars().all(is_name_char) {
            let mut v = value.to_string();
            v.truncate(MAX_VALUE);
            self.env.insert(name.to_string(), v);
        }
    }

    fn command(&mut self, args: &[String], depth: usize) -> Result<bool, String> {
        let Some(cmd) = args.first() else {
            return Ok(true);
        };
        let rest = args.get(1..).unwrap_or(&[]);
        if !matches!(cmd.as_str(), "set")
            && let Some((name, value)) = cmd.split_once('=')
            && !name.is_empty()
            && name.chars().all(is_name_char)
        {
            self.set(name, value);
            return Ok(true);
        }
        Ok(match cmd.as_str() {
            "set" => {
                for a in rest {
                    match a.split_once('=') {
                        Some((n, v)) => self.set(n, v),
                        None => self.set(a, ""),
                    }
                }
                true
            }
            "unset" => {
                for a in rest {
                    self.env.remove(a);
                }
                true
            }
            "true" => true,
            "false" => false,
            "[" | "test" => {
                let mut t: Vec<&str> = rest.iter().map(String::as_str).collect();
                if cmd == "[" {
                    if t.last() != Some(&"]") {
                        return Ok(false);
                    }
                    t.pop();
                }
                self.test(&t)
            }
            "load_env" => {
                self.load_env(rest);
                true
            }
            "search" | "search.fs_uuid" | "search.fs_label" | "search.file" => {
                self.search(cmd, rest)
            }
            "linux" | "linux16" | "linuxefi" => {
                let Some(path) = rest.first() else {
                    return Ok(false);
                };
                let file = self.file(path);
                self.kernel = Some((file, rest.get(1..).unwrap_or(&[]).join(" ")));
                self.initrds.clear();
                true
            }
            "initrd" | "initrd16" | "initrdefi" => {
                self.initrds = rest.iter().map(|p| self.file(p)).collect();
                true
            }
            name => match self.functions.get(name).cloned() {
                Some(body) => self.run(&body, depth + 1)?,
                None => false,
            },
        })
    }

    fn test(&self, t: &[&str]) -> bool {
        match t {
            ["!", rest @ ..] => !self.test(rest),
            [] => false,
            [s] => !s.is_empty(),
            ["-n", s] => !s.is_empty(),
            ["-z", s] => s.is_empty(),
            ["-e" | "-f" | "-s" | "-d", p] => {
                let f = self.file(p);
                match self.host.read(&f) {
                    Some(data) => *t.first().unwrap_or(&"") != "-s" || !data.is_empty(),
                    None => false,
                }
            }
            [a, "=" | "==", b] => a == b,
            [a, "!=", b] => a != b,
            [a, op, b] => {
                let (Ok(x), Ok(y)) = (a.parse::<i64>(), b.parse::<i64>()) else {
                    return false;
                };
                match *op {
                    "-eq" => x == y,
                    "-ne" => x != y,
                    "-lt" => x < y,
                    "-le" => x <= y,
                    "-gt" => x > y,
                    "-ge" => x >= y,
                    _ => false,
                }
            }
            _ => false,
        }
    }

    fn load_env(&mut self, args: &[String]) {
        let mut file = None;
        let mut names = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-f" | "--file" => file = it.next().cloned(),
                "-s" | "--skip-sig" => {}
                n => names.push(n.to_string()),
            }
        }
        let path = file.unwrap_or_else(|| {
            format!(
                "{}/grubenv",
                self.env.get("prefix").map(String::as_str).unwrap_or("")
            )
        });
        let f = self.file(&path);
        let Some(data) = self.host.read(&f) else {
            return;
        };
        let text = String::from_utf8_lossy(data.get(..data.len().min(64 * 1024)).unwrap_or(&[]))
            .into_owned();
        for (n, v) in parse_grubenv(&text) {
            if names.is_empty() || names.contains(&n) {
                self.set(&n, &v);
            }
        }
    }

    fn search(&mut self, cmd: &str, args: &[String]) -> bool {
        let mut kind = match cmd {
            "search.fs_uuid" => SearchKind::FsUuid,
            "search.fs_label" => SearchKind::Label,
            _ => SearchKind::File,
        };
        let mut var = if cmd == "search" {
            None
        } else {
            Some("root".to_string())
        };
        let mut key = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-u" | "--fs-uuid" => kind = SearchKind::FsUuid,
                "-l" | "--label" => kind = SearchKind::Label,
                "-f" | "--file" => kind = SearchKind::File,
                "-s" | "--set" => var = Some("root".into()),
                "--no-floppy" | "-n" | "--efidisk-only" => {}
                s if s.starts_with("--set=") => var = Some(s.trim_start_matches("--set=").into()),
                s if s.starts_with("--hint") => {
                    if !s.contains('=') {
                        it.next();
                    }
                }
                s if s.starts_with('-') => {}
                s => {
                    if key.is_none() {
                        key = Some(s.to_string());
                    } else if cmd != "search" && var.as_deref() == Some("root") {
                        // search.fs_uuid UUID VAR
                        var = Some(s.to_string());
                    }
                }
            }
        }
        let Some(key) = key else { return false };
        match self.host.search(kind, &key) {
            Some(dev) => {
                if let Some(v) = var {
                    self.set(&v, &dev);
                }
                true
            }
            None => false,
        }
    }
}

/// A menuentry's title and `--id` from its arguments.
fn menu_title(args: &[String]) -> (String, Option<String>) {
    let mut title = None;
    let mut id = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--class" | "--users" | "--hotkey" => {
                it.next();
            }
            "--id" => id = it.next().cloned(),
            "--unrestricted" | "--source" => {}
            s if s.starts_with("--") && title.is_none() => {}
            s => {
                if title.is_none() {
                    title = Some(s.to_string());
                }
            }
        }
    }
    (title.unwrap_or_default(), id)
}

/// `grubenv`: `name=value` lines after the `# GRUB Environment Block` header, `#` padding.
pub fn parse_grubenv(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Runs `grub.cfg` (found on `device` in directory `prefix`, e.g. `/boot/grub`) and returns
/// the entry GRUB boots by default, or why there is none.
pub fn default_entry(
    cfg: &str,
    device: &str,
    prefix_dir: &str,
    host: &dyn Host,
) -> Result<Entry, String> {
    let stmts = parse(cfg)?;
    let mut env = HashMap::new();
    for (k, v) in [
        ("root", device.to_string()),
        ("prefix", format!("({device}){prefix_dir}")),
        ("cmdpath", format!("({device})")),
        ("grub_platform", "pc".into()),
        ("grub_cpu", "i386".into()),
        ("feature_menuentry_id", "y".into()),
        ("feature_all_video_module", "y".into()),
        ("feature_default_font_path", "y".into()),
        ("feature_platform_search_hint", "y".into()),
        ("feature_timeout_style", "y".into()),
        ("feature_200_final", "y".into()),
    ] {
        env.insert(k.to_string(), v);
    }
    let mut it = Interp {
        host,
        env,
        functions: HashMap::new(),
        menu: Vec::new(),
        steps: 0,
        kernel: None,
        initrds: Vec::new(),
    };
    it.run(&stmts, 0)?;
    if it.menu.is_empty() {
        return Err("no menuentry".into());
    }
    let mut default = it.env.get("default").cloned().unwrap_or_default();
    if default == "saved" {
        default = it.env.get("saved_entry").cloned().unwrap_or_default();
    }
    let menu = std::mem::take(&mut it.menu);
    let (title, body, env) = choose(&menu, &default, &it.env)
        .or_else(|| choose(&menu, "0", &it.env))
        .ok_or("the menu has no entries")?;
    it.env = env;
    it.env.insert("chosen".into(), title.clone());
    it.kernel = None;
    it.run(&body, 0)?;
    let (kernel, args) = it
        .kernel
        .ok_or_else(|| format!("default entry '{title}' has no linux command"))?;
    Ok(Entry {
        title,
        kernel,
        initrds: it.initrds,
        args,
    })
}

type Chosen = (String, Vec<Stmt>, HashMap<String, String>);

/// The entry `default` names (`N`, a title or id, `A>B` through submenus).
fn choose(menu: &[MenuItem], default: &str, env: &HashMap<String, String>) -> Option<Chosen> {
    let default = default.trim();
    let (head, rest) = match default.split_once('>') {
        Some((h, r)) => (h, Some(r)),
        None => (default, None),
    };
    let head = if head.is_empty() { "0" } else { head };
    let item = match head.parse::<usize>() {
        Ok(n) => menu.get(n)?,
        Err(_) => menu.iter().find(|m| m.matches(head))?,
    };
    match item {
        MenuItem::Entry { title, body, .. } => rest
            .is_none()
            .then(|| (title.clone(), body.clone(), env.clone())),
        MenuItem::Submenu {
            title,
            items,
            env: sub_env,
            ..
        } => {
            let (t, b, e) = choose(items, rest.unwrap_or("0"), sub_env)?;
            Some((format!("{title}>{t}"), b, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk with hd0,gpt1 (UUID aaaa) and hd0,gpt2 (UUID bbbb, label ROOT); files map.
    pub(crate) struct FakeHost {
        pub files: HashMap<(String, String), Vec<u8>>,
    }

    impl Host for FakeHost {
        fn search(&self, kind: SearchKind, key: &str) -> Option<String> {
            match (kind, key) {
                (SearchKind::FsUuid, "aaaa") => Some("hd0,gpt1".into()),
                (SearchKind::FsUuid, "bbbb") => Some("hd0,gpt2".into()),
                (SearchKind::Label, "ROOT") => Some("hd0,gpt2".into()),
                (SearchKind::File, f) => self
                    .files
                    .keys()
                    .find(|(_, p)| p == f)
                    .map(|(d, _)| d.clone()),
                _ => None,
            }
        }
        fn read(&self, file: &FileRef) -> Option<Vec<u8>> {
            self.files
                .get(&(file.device.clone()?, file.path.clone()))
                .cloned()
        }
    }

    fn host() -> FakeHost {
        FakeHost {
            files: HashMap::new(),
        }
    }

    fn f(dev: &str, path: &str) -> FileRef {
        FileRef {
            device: Some(dev.into()),
            path: path.into(),
        }
    }

    /// As update-grub writes it on Debian 12 (trimmed of theme and font lines).
    pub const DEBIAN: &str = r#"#
# DO NOT EDIT THIS FILE
#
# It is automatically generated by grub-mkconfig using templates
# from /etc/grub.d and settings from /etc/default/grub
#

### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi

if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi

export menuentry_id_option

if [ "${prev_saved_entry}" ]; then
  set saved_entry="${prev_saved_entry}"
  save_env saved_entry
  set prev_saved_entry=
  save_env prev_saved_entry
  set boot_once=true
fi

function savedefault {
  if [ -z "${boot_once}" ]; then
    saved_entry="${chosen}"
    save_env saved_entry
  fi
}
function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
    insmod efi_uga
    insmod ieee1275_fb
    insmod vbe
    insmod vga
    insmod video_bochs
    insmod video_cirrus
  fi
}

if [ x$feature_default_font_path = xy ] ; then
   font=unicode
else
insmod part_gpt
insmod ext2
set root='hd0,gpt1'
if [ x$feature_platform_search_hint = xy ]; then
  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt1 --hint-efi=hd0,gpt1 --hint-baremetal=ahci0,gpt1  bbbb
else
  search --no-floppy --fs-uuid --set=root bbbb
fi
    font="/usr/share/grub/unicode.pf2"
fi

if loadfont $font ; then
  set gfxmode=auto
  load_video
  insmod gfxterm
  set locale_dir=$prefix/locale
  set lang=en_US
  insmod gettext
fi
terminal_output gfxterm
if [ "${recordfail}" = 1 ] ; then
  set timeout=30
else
  if [ x$feature_timeout_style = xy ] ; then
    set timeout_style=menu
    set timeout=5
  # Fallback normal timeout code in case the timeout_style feature is
  # unavailable.
  else
    set timeout=5
  fi
fi
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
function gfxmode {
	set gfxpayload="${1}"
}
set linux_gfx_mode=
export linux_gfx_mode
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-bbbb' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	set root='hd0,gpt2'
	if [ x$feature_platform_search_hint = xy ]; then
	  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt2 --hint-efi=hd0,gpt2 --hint-baremetal=ahci0,gpt2  bbbb
	else
	  search --no-floppy --fs-uuid --set=root bbbb
	fi
	echo	'Loading Linux 6.1.0-13-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=bbbb ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-13-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-bbbb' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-6.1.0-13-amd64-advanced-bbbb' {
		load_video
		insmod gzio
		set root='hd0,gpt2'
		search --no-floppy --fs-uuid --set=root bbbb
		echo	'Loading Linux 6.1.0-13-amd64 ...'
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=bbbb ro  quiet
		initrd	/boot/initrd.img-6.1.0-13-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-13-amd64 (recovery mode)' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-6.1.0-13-amd64-recovery-bbbb' {
		load_video
		insmod gzio
		set root='hd0,gpt2'
		search --no-floppy --fs-uuid --set=root bbbb
		linux	/boot/vmlinuz-6.1.0-13-amd64 root=UUID=bbbb ro single 
		initrd	/boot/initrd.img-6.1.0-13-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-10-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-10-amd64-advanced-bbbb' {
		set root='hd0,gpt2'
		search --no-floppy --fs-uuid --set=root bbbb
		linux	/boot/vmlinuz-6.1.0-10-amd64 root=UUID=bbbb ro  quiet
		initrd	/boot/initrd.img-6.1.0-10-amd64
	}
}

### END /etc/grub.d/10_linux ###

### BEGIN /etc/grub.d/30_uefi-firmware ###
if [ "$grub_platform" = "efi" ]; then
	fwsetup --is-supported
	if [ "$?" = 0 ]; then
		menuentry 'UEFI Firmware Settings' $menuentry_id_option 'uefi-firmware' {
			fwsetup
		}
	fi
fi
### END /etc/grub.d/30_uefi-firmware ###
"#;

    #[test]
    fn debian_default_is_the_first_entry() {
        let e = default_entry(DEBIAN, "hd0,gpt2", "/boot/grub", &host()).unwrap();
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.kernel, f("hd0,gpt2", "/boot/vmlinuz-6.1.0-13-amd64"));
        assert_eq!(
            e.initrds,
            vec![f("hd0,gpt2", "/boot/initrd.img-6.1.0-13-amd64")]
        );
        assert_eq!(e.args, "root=UUID=bbbb ro quiet");
    }

    #[test]
    fn debian_saved_default_in_a_submenu() {
        // GRUB_DEFAULT=saved: grub.cfg says default="${saved_entry}" and grubenv names an
        // entry of the submenu by its id path.
        let cfg = DEBIAN.replace("   set default=\"0\"", "   set default=\"${saved_entry}\"");
        let mut h = host();
        h.files.insert(
            ("hd0,gpt2".into(), "/boot/grub/grubenv".into()),
            b"# GRUB Environment Block\nsaved_entry=gnulinux-advanced-bbbb>gnulinux-6.1.0-10-amd64-advanced-bbbb\n#######".to_vec(),
        );
        let e = default_entry(&cfg, "hd0,gpt2", "/boot/grub", &h).unwrap();
        assert_eq!(
            e.title,
            "Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-10-amd64"
        );
        assert_eq!(e.kernel.path, "/boot/vmlinuz-6.1.0-10-amd64");
        // Numeric paths: submenu 1, entry 1 (recovery).
        let cfg = DEBIAN.replace("   set default=\"0\"", "   set default=\"1>1\"");
        let e = default_entry(&cfg, "hd0,gpt2", "/boot/grub", &host()).unwrap();
        assert!(e.title.ends_with("(recovery mode)"), "{}", e.title);
        assert_eq!(e.args, "root=UUID=bbbb ro single");
        // A title; and an unknown default falls back to entry 0.
        let cfg = DEBIAN.replace(
            "   set default=\"0\"",
            "   set default=\"Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-10-amd64\"",
        );
        let e = default_entry(&cfg, "hd0,gpt2", "/boot/grub", &host()).unwrap();
        assert_eq!(e.kernel.path, "/boot/vmlinuz-6.1.0-10-amd64");
        let cfg = DEBIAN.replace("   set default=\"0\"", "   set default=\"nope\"");
        let e = default_entry(&cfg, "hd0,gpt2", "/boot/grub", &host()).unwrap();
        assert_eq!(e.title, "Debian GNU/Linux");
    }

    /// Ubuntu 22.04 with a separate /boot (hd0,gpt2, UUID aaaa): paths are relative to it.
    pub const UBUNTU_SEPARATE_BOOT: &str = r#"
set default="0"
function load_video { insmod all_video; }
if [ x$feature_menuentry_id = xy ]; then menuentry_id_option="--id"; else menuentry_id_option=""; fi
export menuentry_id_option
set timeout_style=hidden
set timeout=0
menuentry 'Ubuntu' --class ubuntu --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-bbbb' {
	recordfail
	load_video
	gfxmode $linux_gfx_mode
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root aaaa
	linux	/vmlinuz-5.15.0-91-generic root=UUID=bbbb ro  console=tty1 console=ttyS0 $vt_handoff
	initrd	/initrd.img-5.15.0-91-generic
}
submenu 'Advanced options for Ubuntu' $menuentry_id_option 'gnulinux-advanced-bbbb' {
	menuentry 'Ubuntu, with Linux 5.15.0-91-generic' --class ubuntu $menuentry_id_option 'gnulinux-5.15.0-91-generic-advanced-bbbb' {
		search --no-floppy --fs-uuid --set=root aaaa
		linux	/vmlinuz-5.15.0-91-generic root=UUID=bbbb ro  console=tty1 console=ttyS0 $vt_handoff
		initrd	/initrd.img-5.15.0-91-generic
	}
}
menuentry "Memory test (memtest86+.bin)" {
	insmod part_gpt
	linux16	/memtest86+.bin
}
"#;

    #[test]
    fn ubuntu_separate_boot_partition() {
        let e = default_entry(UBUNTU_SEPARATE_BOOT, "hd0,gpt2", "/grub", &host()).unwrap();
        assert_eq!(e.title, "Ubuntu");
        assert_eq!(e.kernel, f("hd0,gpt1", "/vmlinuz-5.15.0-91-generic"));
        assert_eq!(e.args, "root=UUID=bbbb ro console=tty1 console=ttyS0");
        let cfg = UBUNTU_SEPARATE_BOOT.replace("set default=\"0\"", "set default=2");
        let e = default_entry(&cfg, "hd0,gpt2", "/grub", &host()).unwrap();
        assert_eq!(e.kernel, f("hd0,gpt2", "/memtest86+.bin"));
    }

    #[test]
    fn explicit_devices_labels_and_quoting() {
        let cfg = r#"
set default=second   # by id
set extra="quiet splash"
menuentry first { linux /a }
menuentry "Second \"one\"" --id second {
    search --label --set=dev ROOT
    linux ($dev)/boot/vmlinuz root=LABEL=ROOT 'a b' "x=$extra" ${extra}
    initrd (hd0,gpt1)/microcode.img /boot/initrd.img
}
"#;
        let e = default_entry(cfg, "hd0,gpt1", "/boot/grub", &host()).unwrap();
        assert_eq!(e.title, "Second \"one\"");
        assert_eq!(e.kernel, f("hd0,gpt2", "/boot/vmlinuz"));
        assert_eq!(e.args, "root=LABEL=ROOT a b x=quiet splash quiet splash");
        assert_eq!(
            e.initrds,
            vec![
                f("hd0,gpt1", "/microcode.img"),
                f("hd0,gpt1", "/boot/initrd.img")
            ]
        );
    }

    #[test]
    fn grub_errors() {
        let h = host();
        // Fedora's grub.cfg boots Boot Loader Spec entries: no menuentry of its own.
        let fedora = "set default=\"${saved_entry}\"\ninsmod blscfg\nblscfg\n";
        assert_eq!(
            default_entry(fedora, "hd0,gpt2", "/grub2", &h).unwrap_err(),
            "no menuentry"
        );
        assert!(
            default_entry("menuentry x { echo hi }", "hd0", "/boot/grub", &h)
                .unwrap_err()
                .contains("has no linux command")
        );
        assert!(default_entry("menuentry 'x { linux /a }", "hd0", "/", &h).is_err());
        assert!(default_entry("menuentry x { linux /a ", "hd0", "/", &h).is_err());
        assert!(default_entry("if true; then menuentry x { linux /a }", "hd0", "/", &h).is_err());
        // Deep nesting and endless recursion are cut off, not a stack overflow.
        let deep = "if true; then ".repeat(5000);
        assert!(default_entry(&deep, "hd0", "/", &h).is_err());
        let rec = "function f { f }\nf\nmenuentry x { linux /a }";
        assert!(default_entry(rec, "hd0", "/", &h).is_err());
    }

    #[test]
    fn conditions() {
        let cfg = r#"
a=1
if [ "$a" -gt 5 ]; then set p=big; elif [ ! -z "$a" ] ; then set p=small; else set p=none; fi
if test x$b = x; then set q=empty; fi
menuentry "$p-$q" { linux /k }
"#;
        let e = default_entry(cfg, "hd0", "/boot/grub", &host()).unwrap();
        assert_eq!(e.title, "small-empty");
        assert_eq!(e.kernel, f("hd0", "/k"));
    }
}
