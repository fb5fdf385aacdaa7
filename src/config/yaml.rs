//! The YAML front end: one pass over yaml-rust2's marked events builds both the figment
//! values and the position of every key, so values and lines can never disagree and
//! the text is parsed once.
//!
//! Scalars are typed the way the pipeline format always read them (YAML 1.2 core
//! schema, as serde_norway resolves it): a plain `~`, `null` or empty value is null,
//! `true`/`false` (also capitalised or upper-case) are booleans, decimal, `0x`, `0o`
//! and `0b` integers are numbers (but `007` stays text), then floats (`1e-3`, `.inf`,
//! `.nan`); everything else, and every quoted or block scalar, is text. The core tags
//! `!!str`, `!!int`, `!!float`, `!!bool` and `!!null` force a type; other tags are errors.
//!
//! Nesting is bounded twice: [`check_flow_depth`] scans the raw text for `[`/`{`
//! nesting before the parser sees it (the scanner's cost grows with the flow depth, so
//! a file of a million `[` would take minutes to reject), and the event loop refuses
//! any structure deeper than [`MAX_DEPTH`], whichever syntax built it.

use std::collections::HashMap;

use figment::value::{Dict, Empty, Num, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::key_lines::{KeyLines, join};

/// The deepest nesting of maps and lists a pipeline file may have. Real pipelines
/// nest a handful of levels (tool schemas inside settings perhaps a dozen); serde_norway,
/// which read these files before, refused depth 128 too.
pub const MAX_DEPTH: usize = 128;

/// Values built from aliases (`*name`) may not exceed this many nodes in total: a few
/// lines of anchors that refer to each other would otherwise expand exponentially.
const MAX_ALIAS_NODES: usize = 1_000_000;

const DEPTH_HELP: &str =
    "a pipeline nests a few levels; this file is malformed or was generated wrongly";

/// Why a YAML text was refused, with its 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    /// What is wrong, without the position.
    pub message: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What the user can do about it, when there is something specific.
    pub help: Option<String>,
}

impl YamlError {
    fn at(mark: Marker, message: impl Into<String>) -> YamlError {
        YamlError {
            message: message.into(),
            line: mark.line(),
            column: mark.col() + 1,
            help: None,
        }
    }
}

/// A key given twice in one map: its dotted path and both lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Dotted path of the key (`stages.s1.with.cmd`).
    pub path: String,
    /// Line of the first occurrence.
    pub first: usize,
    /// Line of the second.
    pub second: usize,
}

/// What can go wrong parsing a pipeline's YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YamlFailure {
    /// Syntax, nesting, or an unsupported construct.
    Invalid(YamlError),
    /// A repeated key, which YAML would otherwise let the last one win silently.
    Duplicate(DuplicateKey),
}

impl From<YamlError> for YamlFailure {
    fn from(error: YamlError) -> Self {
        YamlFailure::Invalid(error)
    }
}

/// Parses `text` (one document, or none) into its value and the positions of its keys.
/// An empty document is `Value::Empty`.
pub fn parse(text: &str) -> Result<(Value, KeyLines), YamlFailure> {
    check_flow_depth(text)?;
    Builder::default().run(text)
}

/// Parses one scalar or flow value the way a plain YAML value reads (`100`, `true`,
/// `[a, b]`, `text`), for `--set` and `TRAINYARD_*` overrides. `None` when it is not
/// one YAML value (then the caller takes the text as it is).
pub fn parse_value(text: &str) -> Option<Value> {
    match parse(text) {
        Ok((value, _)) => Some(value),
        Err(_) => None,
    }
}

/// Refuses `[`/`{` nesting deeper than [`MAX_DEPTH`] by one linear scan of the raw
/// text, before any parser runs. It follows just enough YAML to know where a flow
/// collection can start: outside quotes and comments, and in block context only where
/// a value starts (at the start of a line, after `- `, `? ` or `: `), not inside plain
/// text such as `cmd: echo a[1]`; block scalars (`|`, `>`) are skipped. It can only
/// over-count in odd corners (a continuation line of plain text that starts with `[`),
/// and the limit is far above any real pipeline.
pub fn check_flow_depth(text: &str) -> Result<(), YamlError> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut line_start = 0usize;
    let mut index = 0usize;
    // Whether the next non-blank character starts a node (a value, key or entry).
    let mut node_start = true;
    // Indentation of the line holding a `|` or `>`: deeper lines are its content.
    let mut block_scalar: Option<usize> = None;
    let too_deep = |line: usize, column: usize| YamlError {
        message: format!("nesting deeper than {MAX_DEPTH} levels of `[` / `{{`"),
        line,
        column,
        help: Some(DEPTH_HELP.to_string()),
    };
    while index < bytes.len() {
        if index == line_start {
            let indent = bytes[index..]
                .iter()
                .take_while(|&&byte| byte == b' ')
                .count();
            let rest = &bytes[index + indent..];
            let blank = rest
                .first()
                .is_none_or(|&byte| byte == b'\n' || byte == b'\r');
            if let Some(parent) = block_scalar {
                if blank || indent > parent {
                    index = skip_line(bytes, index);
                    line += 1;
                    line_start = index;
                    continue;
                }
                block_scalar = None;
            }
            if depth == 0 {
                node_start = true;
            }
        }
        let byte = bytes[index];
        match byte {
            b'\n' => {
                line += 1;
                index += 1;
                line_start = index;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                index += 1;
                continue;
            }
            b'#' if index == line_start || matches!(bytes[index - 1], b' ' | b'\t') => {
                index = skip_to_line_end(bytes, index);
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            // Block context.
            if !node_start {
                // Inside plain text or a key: only `: ` (a value follows) matters.
                if byte == b':' && next_is_blank(bytes, index + 1) {
                    node_start = true;
                }
                index += 1;
                continue;
            }
            match byte {
                b'[' | b'{' => {
                    depth = 1;
                    node_start = true;
                }
                b'"' | b'\'' => {
                    let end = skip_quoted(bytes, index, &mut line, &mut line_start);
                    index = end;
                    node_start = false;
                    continue;
                }
                b'-' | b'?' | b':' if next_is_blank(bytes, index + 1) => {
                    node_start = true;
                }
                b'&' | b'!' => {
                    // An anchor or a tag: the node itself follows it.
                    index = skip_word(bytes, index);
                    continue;
                }
                b'|' | b'>' => {
                    // Lines indented deeper than this one are the block scalar's text.
                    let indent = bytes[line_start..]
                        .iter()
                        .take_while(|&&byte| byte == b' ')
                        .count();
                    block_scalar = Some(indent);
                    index = skip_to_line_end(bytes, index);
                    continue;
                }
                _ => node_start = false,
            }
            index += 1;
            continue;
        }
        // Flow context: plain text cannot hold `[]{},`, so every bracket counts.
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    // Columns count characters, as the parser's do.
                    let column = text[line_start..index].chars().count() + 1;
                    return Err(too_deep(line, column));
                }
                node_start = true;
            }
            b']' | b'}' => {
                depth -= 1;
                node_start = false;
            }
            b',' | b'?' | b':' => node_start = true,
            b'&' | b'!' if node_start => {
                index = skip_word(bytes, index);
                continue;
            }
            b'"' | b'\'' if node_start => {
                index = skip_quoted(bytes, index, &mut line, &mut line_start);
                node_start = false;
                continue;
            }
            _ => node_start = false,
        }
        index += 1;
    }
    Ok(())
}

fn next_is_blank(bytes: &[u8], index: usize) -> bool {
    bytes
        .get(index)
        .is_none_or(|&byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Index of the `\n` ending the line at `index` (or the end of the text).
fn skip_to_line_end(bytes: &[u8], index: usize) -> usize {
    memchr::memchr(b'\n', &bytes[index..]).map_or(bytes.len(), |offset| index + offset)
}

/// Index of the first blank (or flow indicator) after the anchor or tag at `index`.
fn skip_word(bytes: &[u8], index: usize) -> usize {
    bytes[index..]
        .iter()
        .position(|&byte| {
            matches!(
                byte,
                b' ' | b'\t' | b'\n' | b'\r' | b',' | b'[' | b']' | b'{' | b'}'
            )
        })
        .map_or(bytes.len(), |offset| index + offset)
}

/// Index just past the line at `index`.
fn skip_line(bytes: &[u8], index: usize) -> usize {
    (skip_to_line_end(bytes, index) + 1).min(bytes.len())
}

/// Index just past the quoted scalar starting at `start`, counting the lines it spans.
fn skip_quoted(bytes: &[u8], start: usize, line: &mut usize, line_start: &mut usize) -> usize {
    let quote = bytes[start];
    let mut index = start + 1;
    while index < bytes.len() {
        match bytes[index] {
            b'\\' if quote == b'"' => index += 1,
            b'\'' if quote == b'\'' && bytes.get(index + 1) == Some(&b'\'') => index += 1,
            byte if byte == quote => return index + 1,
            b'\n' => {
                *line += 1;
                *line_start = index + 1;
            }
            _ => {}
        }
        index += 1;
    }
    bytes.len()
}

/// A map or list being built.
enum Frame {
    Map {
        dict: Dict,
        path: String,
        /// The key whose value comes next.
        pending: Option<String>,
        anchor: usize,
    },
    Seq {
        items: Vec<Value>,
        path: String,
        anchor: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    lines: KeyLines,
    anchors: HashMap<usize, Value>,
    alias_nodes: usize,
    root: Option<Value>,
}

impl Builder {
    fn run(mut self, text: &str) -> Result<(Value, KeyLines), YamlFailure> {
        let mut parser = Parser::new_from_str(text);
        let mut documents = 0usize;
        loop {
            let (event, mark) = parser.next_token().map_err(|error| YamlError {
                message: error.info().to_string(),
                line: error.marker().line(),
                column: error.marker().col() + 1,
                help: None,
            })?;
            match event {
                Event::StreamEnd => break,
                Event::DocumentStart => {
                    documents += 1;
                    if documents > 1 {
                        return Err(YamlError::at(
                            mark,
                            "more than one YAML document (a second `---`); a pipeline file is one document",
                        )
                        .into());
                    }
                }
                Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
                Event::Scalar(text, style, anchor, tag) => {
                    if let Some(text) = self.take_key(text, mark)? {
                        let value = scalar(text, style, tag.as_ref(), mark)?;
                        self.finish(value, anchor);
                    }
                }
                Event::Alias(id) => {
                    if self.expects_key() {
                        return Err(
                            YamlError::at(mark, "an alias (`*name`) cannot be a key").into()
                        );
                    }
                    let value = self.anchors.get(&id).cloned().ok_or_else(|| {
                        YamlError::at(mark, "alias to an anchor that is not defined")
                    })?;
                    self.alias_nodes += count_nodes(&value);
                    if self.alias_nodes > MAX_ALIAS_NODES {
                        return Err(YamlError::at(
                            mark,
                            format!("aliases expand to more than {MAX_ALIAS_NODES} values"),
                        )
                        .into());
                    }
                    self.finish(value, 0);
                }
                Event::MappingStart(anchor, tag) => {
                    self.start(true, anchor, tag.as_ref(), mark)?;
                }
                Event::SequenceStart(anchor, tag) => {
                    self.start(false, anchor, tag.as_ref(), mark)?;
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    let (value, anchor) = match self.stack.pop() {
                        Some(Frame::Map { dict, anchor, .. }) => (Value::from(dict), anchor),
                        Some(Frame::Seq { items, anchor, .. }) => (Value::from(items), anchor),
                        None => continue,
                    };
                    self.finish(value, anchor);
                }
            }
        }
        // No document at all reads as serde_norway read it: none, not null.
        let value = self
            .root
            .unwrap_or(Value::Empty(figment::value::Tag::Default, Empty::None));
        Ok((value, self.lines))
    }

    fn expects_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { pending: None, .. }))
    }

    /// The dotted path of the value that comes next.
    fn child_path(&self) -> String {
        match self.stack.last() {
            Some(Frame::Map {
                path,
                pending: Some(key),
                ..
            }) => join(path, key),
            Some(Frame::Seq { path, items, .. }) => join(path, &items.len().to_string()),
            _ => String::new(),
        }
    }

    /// Takes a scalar as the next key when a map expects one (`None`), or gives it
    /// back when it is a value.
    fn take_key(&mut self, text: String, mark: Marker) -> Result<Option<String>, YamlFailure> {
        let Some(Frame::Map {
            dict,
            path,
            pending: pending @ None,
            ..
        }) = self.stack.last_mut()
        else {
            return Ok(Some(text));
        };
        let key_path = join(path, &text);
        if dict.contains_key(&text) {
            let first = self.lines.exact(&key_path).map_or(0, |(line, _)| line);
            return Err(YamlFailure::Duplicate(DuplicateKey {
                path: key_path,
                first,
                second: mark.line(),
            }));
        }
        self.lines.record(key_path, mark.line(), mark.col() + 1);
        *pending = Some(text);
        Ok(None)
    }

    /// Opens a map or a list, refusing keys that are not text and nesting deeper than
    /// [`MAX_DEPTH`].
    fn start(
        &mut self,
        map: bool,
        anchor: usize,
        tag: Option<&Tag>,
        mark: Marker,
    ) -> Result<(), YamlFailure> {
        if let Some(tag) = tag
            && !(tag.handle == CORE_TAG && matches!(tag.suffix.as_str(), "map" | "seq"))
        {
            return Err(YamlError::at(
                mark,
                format!("unsupported YAML tag `{}{}`", tag.handle, tag.suffix),
            )
            .into());
        }
        if self.expects_key() {
            return Err(YamlError::at(mark, "a key must be text, not a map or a list").into());
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError {
                help: Some(DEPTH_HELP.to_string()),
                ..YamlError::at(mark, format!("nesting deeper than {MAX_DEPTH} levels"))
            }
            .into());
        }
        let path = self.child_path();
        self.stack.push(match map {
            true => Frame::Map {
                dict: Dict::new(),
                path,
                pending: None,
                anchor,
            },
            false => Frame::Seq {
                items: Vec::new(),
                path,
                anchor,
            },
        });
        Ok(())
    }

    /// Puts a finished value where it belongs: under the pending key, at the end of the
    /// list, or as the document.
    fn finish(&mut self, value: Value, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        match self.stack.last_mut() {
            Some(Frame::Map { dict, pending, .. }) => {
                if let Some(key) = pending.take() {
                    dict.insert(key, value);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(value),
            None => self.root = Some(value),
        }
    }
}

/// Number of values in `value`, itself included.
fn count_nodes(value: &Value) -> usize {
    match value {
        Value::Dict(_, dict) => 1 + dict.values().map(count_nodes).sum::<usize>(),
        Value::Array(_, items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        _ => 1,
    }
}

const CORE_TAG: &str = "tag:yaml.org,2002:";

/// The value of one scalar: typed when plain (see the module doc), text otherwise.
fn scalar(
    text: String,
    style: TScalarStyle,
    tag: Option<&Tag>,
    mark: Marker,
) -> Result<Value, YamlError> {
    if let Some(tag) = tag {
        let invalid = |expected: &str| {
            YamlError::at(
                mark,
                format!(
                    "`{text}` is not {expected}, as its tag `!!{}` says",
                    tag.suffix
                ),
            )
        };
        if tag.handle == CORE_TAG {
            return match tag.suffix.as_str() {
                "str" => Ok(Value::from(text)),
                "bool" => parse_bool(&text)
                    .map(Value::from)
                    .ok_or_else(|| invalid("a boolean")),
                "int" => parse_int(&text).ok_or_else(|| invalid("an integer")),
                "float" => parse_float(&text)
                    .map(Value::from)
                    .ok_or_else(|| invalid("a number")),
                "null" => match is_null(&text) && !text.is_empty() {
                    true => Ok(null()),
                    false => Err(invalid("null")),
                },
                other => Err(YamlError::at(
                    mark,
                    format!("unsupported YAML tag `!!{other}`"),
                )),
            };
        }
        // Local tags name types this format does not have (serde_norway read them as
        // a one-key map, `{tag: value}`, which no setting expects).
        return Err(YamlError::at(
            mark,
            format!("unsupported YAML tag `{}{}`", tag.handle, tag.suffix),
        ));
    }
    if style != TScalarStyle::Plain {
        return Ok(Value::from(text));
    }
    Ok(plain(text))
}

fn null() -> Value {
    Value::Empty(figment::value::Tag::Default, Empty::Unit)
}

/// A plain scalar, typed by the YAML 1.2 core schema.
fn plain(text: String) -> Value {
    if text.is_empty() || is_null(&text) {
        return null();
    }
    if let Some(boolean) = parse_bool(&text) {
        return Value::from(boolean);
    }
    if let Some(number) = parse_int(&text) {
        return number;
    }
    if !leading_zero_digits(&text)
        && let Some(float) = parse_float(&text)
    {
        return Value::from(float);
    }
    Value::from(text)
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// `007`, `-01`: digits with a leading zero are text in YAML 1.2.
fn leading_zero_digits(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    digits.len() > 1 && digits.starts_with('0') && digits[1..].bytes().all(|b| b.is_ascii_digit())
}

/// An integer: unsigned ones as `u64` (or `u128`), negative ones as `i64` (or `i128`),
/// as serde_norway gave them, so that settings deserialise the same.
fn parse_int(text: &str) -> Option<Value> {
    let number = |num: Num| Value::Num(figment::value::Tag::Default, num);
    if let Some(value) = parse_unsigned(text, u64::from_str_radix) {
        return Some(number(Num::U64(value)));
    }
    if let Some(value) = parse_negative(text, i64::from_str_radix) {
        return Some(number(Num::I64(value)));
    }
    if let Some(value) = parse_unsigned(text, u128::from_str_radix) {
        return Some(number(Num::U128(value)));
    }
    if let Some(value) = parse_negative(text, i128::from_str_radix) {
        return Some(number(Num::I128(value)));
    }
    None
}

type Radix<T> = fn(&str, u32) -> Result<T, std::num::ParseIntError>;

fn parse_unsigned<T>(text: &str, from_str_radix: Radix<T>) -> Option<T> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(rest) = digits.strip_prefix(prefix) {
            if rest.starts_with(['+', '-']) {
                return None;
            }
            if let Ok(value) = from_str_radix(rest, radix) {
                return Some(value);
            }
        }
    }
    if digits.starts_with(['+', '-']) || leading_zero_digits(text) {
        return None;
    }
    from_str_radix(digits, 10).ok()
}

fn parse_negative<T>(text: &str, from_str_radix: Radix<T>) -> Option<T> {
    for (prefix, radix) in [("-0x", 16), ("-0o", 8), ("-0b", 2)] {
        if let Some(rest) = text.strip_prefix(prefix)
            && let Ok(value) = from_str_radix(&format!("-{rest}"), radix)
        {
            return Some(value);
        }
    }
    if leading_zero_digits(text) {
        return None;
    }
    from_str_radix(text, 10).ok()
}

fn parse_float(text: &str) -> Option<f64> {
    let unsigned = match text.strip_prefix('+') {
        Some(rest) if rest.starts_with(['+', '-']) => return None,
        Some(rest) => rest,
        None => text,
    };
    match unsigned {
        ".inf" | ".Inf" | ".INF" => return Some(f64::INFINITY),
        _ => {}
    }
    match text {
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    unsigned
        .parse::<f64>()
        .ok()
        .filter(|float| float.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value serde_norway (the previous front end) gives `text`, for comparison.
    fn reference(text: &str) -> Value {
        serde_norway::from_str::<Value>(text).unwrap()
    }

    fn value(text: &str) -> Value {
        parse(text).unwrap().0
    }

    #[test]
    fn scalars_are_typed_as_the_previous_front_end_typed_them() {
        let scalars = [
            "1",
            "-1",
            "+5",
            "0",
            "-0",
            "+0",
            "007",
            "-007",
            "00",
            "0x1F",
            "-0x1F",
            "0o17",
            "0b101",
            "0x",
            "0xG",
            "1_000",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1.5",
            "-1.5",
            "+1.5",
            "1e3",
            "-1e-3",
            "1.",
            ".5",
            "+.5",
            "0.1",
            "3.0e-4",
            ".inf",
            "-.inf",
            "+.inf",
            ".Inf",
            ".NaN",
            ".nan",
            "nan",
            "inf",
            "1e999",
            "true",
            "True",
            "TRUE",
            "false",
            "tRUE",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "null",
            "Null",
            "NULL",
            "~",
            "nul",
            "12:30:00",
            "2024-01-01",
            "1:2",
            "~x",
            "a b",
            "'1'",
            "\"true\"",
            "'null'",
            "\"0x10\"",
            "\"\"",
            "''",
            "!!str 12",
            "!!int \"12\"",
            "!!float 1",
            "!!bool \"true\"",
            "!!null ~",
            "\"a\\tb\"",
            "'it''s'",
            "|\n  12\n",
            ">\n  folded\n  text\n",
            "|-\n  7\n",
            "[1, '2', true, ~, 0.5]",
            "{a: 1, b: [x, 2.5], c: {d: null}}",
            "\n  - 1\n  - two\n  - 3.0\n",
        ];
        for scalar in scalars {
            let document = format!("key: {scalar}\n");
            assert_eq!(
                format!("{:?}", value(&document)),
                format!("{:?}", reference(&document)),
                "{document:?}"
            );
        }
    }

    #[test]
    fn documents_read_as_before() {
        for text in [
            "",
            "# only a comment\n",
            "---\nname: p\n",
            "name: p\n...\n",
            "a:\n  b:\n    - c: 1\n      d: [x, {e: f}]\n  g: |\n    line one\n    line two\n",
            "a: &anchor {x: 1, y: [2]}\nb: *anchor\n",
            "'quoted key': 1\n\"other\": 2\n3: three\n",
            "stages:\n  s: { kind: command, with: { cmd: \"echo ${vars.x}\" } }\n",
            "a: b: c\n",
        ] {
            match (parse(text), serde_norway::from_str::<Value>(text)) {
                (Ok((mine, _)), Ok(theirs)) => {
                    assert_eq!(format!("{mine:?}"), format!("{theirs:?}"), "{text:?}")
                }
                (Err(_), Err(_)) => {}
                (mine, theirs) => panic!("{text:?}: {mine:?} vs {theirs:?}"),
            }
        }
    }

    #[test]
    fn keys_get_their_positions_and_lists_their_indices() {
        let (_, lines) = parse("a:\n  b: 1\n  c:\n    - d: 2\n    - e: 3\n").unwrap();
        assert_eq!(lines.exact("a"), Some((1, 1)));
        assert_eq!(lines.exact("a.b"), Some((2, 3)));
        assert_eq!(lines.exact("a.c.0.d"), Some((4, 7)));
        assert_eq!(lines.exact("a.c.1.e"), Some((5, 7)));
    }

    #[test]
    fn a_second_document_is_refused() {
        let Err(YamlFailure::Invalid(error)) = parse("a: 1\n---\nb: 2\n") else {
            panic!("accepted two documents");
        };
        assert_eq!(error.line, 2);
        assert!(
            error.message.contains("more than one YAML document"),
            "{error:?}"
        );
    }

    #[test]
    fn unsupported_tags_and_map_keys_are_errors() {
        for text in [
            "a: !custom x\n",
            "a: ! 12\n",
            "a: !!binary aGk=\n",
            "a: !t {b: 1}\n",
            "? [a]\n: 1\n",
            "{[a]: 1}\n",
        ] {
            assert!(
                matches!(parse(text), Err(YamlFailure::Invalid(_))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn aliases_cannot_expand_without_bound() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let previous = level - 1;
            text.push_str(&format!(
                "a{level}: &a{level} [*a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}]\n"
            ));
        }
        let Err(YamlFailure::Invalid(error)) = parse(&text) else {
            panic!("a billion values were built");
        };
        assert!(error.message.contains("aliases expand"), "{error:?}");
    }

    #[test]
    fn flow_nesting_is_bounded_before_parsing() {
        let ok = format!("a: {}{}\n", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(check_flow_depth(&ok).is_ok());
        let deep = format!("name: x\nstages:\n  a: {}\n", "{a: ".repeat(MAX_DEPTH + 1));
        let error = check_flow_depth(&deep).unwrap_err();
        assert_eq!((error.line, error.column), (3, 6 + 4 * MAX_DEPTH));
    }

    #[test]
    fn brackets_in_text_quotes_comments_and_block_scalars_do_not_count() {
        let brackets = "[".repeat(MAX_DEPTH + 1);
        for text in [
            format!("cmd: echo {brackets}\n"),
            format!("cmd: \"{brackets}\"\n"),
            format!("cmd: '{brackets}'\n"),
            format!("cmd: x # {brackets}\n"),
            format!("# {brackets}\n"),
            format!("cmd: |\n  {brackets}\n  more\nnext: 1\n"),
            format!("- >\n    {brackets}\n"),
            format!("list: [\"{brackets}\", '{brackets}', a]\n"),
            format!("cmd: it's {brackets}\n"),
            format!("it's: x\ncmd: a'{brackets}\n"),
        ] {
            assert!(check_flow_depth(&text).is_ok(), "{text}");
            parse(&text).unwrap();
        }
    }

    #[test]
    fn block_nesting_is_bounded_too() {
        let text = "- ".repeat(MAX_DEPTH + 1) + "x\n";
        let Err(YamlFailure::Invalid(error)) = parse(&text) else {
            panic!("accepted nesting deeper than {MAX_DEPTH}");
        };
        assert!(error.message.contains("nesting deeper than"), "{error:?}");
        assert_eq!(error.line, 1);
    }

    #[test]
    fn a_megabyte_of_open_brackets_is_refused_at_once() {
        let text = format!("name: deep\nstages:\n  a: {}\n", "[".repeat(1 << 20));
        let started = std::time::Instant::now();
        let Err(YamlFailure::Invalid(error)) = parse(&text) else {
            panic!("accepted");
        };
        assert_eq!(error.line, 3);
        // Generous: the scan is linear and stops at the limit; the parser alone took
        // minutes on this.
        assert!(
            started.elapsed().as_secs_f64() < 2.0,
            "{:?}",
            started.elapsed()
        );
    }
}
