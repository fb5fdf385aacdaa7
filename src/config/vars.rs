//! Pipeline variables: `${vars.NAME}` inside stage settings and inputs is replaced by the
//! value of `vars.NAME` after all layers are merged. A value that is exactly one
//! `${vars.NAME}` takes the variable's value with its type (a number stays a number, a
//! map stays a map); inside longer text the variable must be a scalar and is spliced in
//! as text. `$${` is a literal `${`; any other `${…}` (a shell variable in a `cmd`) is
//! left alone.

use figment::value::{Dict, Value};

/// What a variable reference opens with.
const OPEN: &str = "${vars.";
/// The escape for a literal `${`.
const ESCAPED: &str = "$${";

/// One piece of a string: literal text or a variable use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text kept as is (escapes already undone).
    Text(String),
    /// `${vars.NAME}`: the (possibly dotted) name.
    Var(String),
}

/// Whether `name` is usable after `vars.`: dotted parts of letters, digits, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// Splits `text` into literal text and variable uses. Fails with a message when a
/// `${vars.` is not closed or names nothing usable.
pub fn parse(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(ESCAPED) {
            literal.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix(OPEN) {
            let Some(end) = after.find('}') else {
                return Err(format!(
                    "`{OPEN}` is not closed by `}}` in \"{text}\" (write `$${{` for a literal `${{`)"
                ));
            };
            let name = &after[..end];
            if !valid_name(name) {
                return Err(format!(
                    "`${{vars.{name}}}` is not a variable name (letters, digits, `_`, `-`, dots for nested keys)"
                ));
            }
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Var(name.to_string()));
            rest = &after[end + 1..];
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                literal.push(c);
            }
            rest = chars.as_str();
        }
    }
    if !literal.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

/// Whether `text` holds anything [`parse`] would change (a use or an escape).
pub fn mentions(text: &str) -> bool {
    text.contains(OPEN) || text.contains(ESCAPED)
}

/// The value at a dotted `name` inside the merged `vars` map.
pub fn lookup<'a>(vars: &'a Dict, name: &str) -> Option<&'a Value> {
    let mut parts = name.split('.');
    let mut value = vars.get(parts.next()?)?;
    for part in parts {
        value = value.as_dict()?.get(part)?;
    }
    Some(value)
}

/// A scalar as the text spliced into a longer string; `None` for maps and lists.
pub fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(_, text) => Some(text.clone()),
        Value::Char(_, c) => Some(c.to_string()),
        Value::Bool(_, flag) => Some(flag.to_string()),
        Value::Num(..) => serde_json::to_value(value)
            .ok()
            .map(|json| json.to_string()),
        Value::Empty(..) => Some(String::new()),
        Value::Dict(..) | Value::Array(..) => None,
    }
}

/// A short name for a value's type, for messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Dict(..) => "a map",
        Value::Array(..) => "a list",
        _ => "a scalar",
    }
}

/// Escapes the resolved values of a whole pipeline (`values_json`: every stage's `with`
/// and `inputs`, and `vars`) so that, written as a pipeline file, they load unchanged: a
/// `${` left in them is literal text, not a variable.
pub fn escape_resolved(values: &mut serde_json::Value) {
    if let Some(stages) = values
        .get_mut("stages")
        .and_then(serde_json::Value::as_object_mut)
    {
        for stage in stages.values_mut() {
            for section in ["with", "inputs"] {
                if let Some(value) = stage.get_mut(section) {
                    escape_json(value);
                }
            }
        }
    }
    if let Some(vars) = values.get_mut("vars") {
        escape_json(vars);
    }
}

/// Re-escapes every `${` in the strings of `value` as `$${`, so that resolved values
/// written back into a pipeline file (`audit --reproduce`) read back unchanged.
pub fn escape_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) if text.contains("${") => {
            *text = text.replace("${", ESCAPED);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(escape_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(escape_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(name: &str) -> Piece {
        Piece::Var(name.to_string())
    }
    fn text(text: &str) -> Piece {
        Piece::Text(text.to_string())
    }

    #[test]
    fn uses_escapes_and_foreign_braces_split_as_written() {
        assert_eq!(parse("${vars.base}").unwrap(), [var("base")]);
        assert_eq!(
            parse("run-${vars.tag}-${vars.model.size}!").unwrap(),
            [
                text("run-"),
                var("tag"),
                text("-"),
                var("model.size"),
                text("!")
            ]
        );
        assert_eq!(parse("$${vars.tag}").unwrap(), [text("${vars.tag}")]);
        assert_eq!(parse("echo ${HOME} $x").unwrap(), [text("echo ${HOME} $x")]);
        assert_eq!(parse("").unwrap(), [text("")]);
        assert_eq!(parse("é${vars.a}").unwrap(), [text("é"), var("a")]);
        assert!(parse("x ${vars.tag").unwrap_err().contains("not closed"));
        assert!(
            parse("${vars.}")
                .unwrap_err()
                .contains("not a variable name")
        );
        assert!(parse("${vars.a b}").is_err());
    }

    #[test]
    fn escaping_a_resolved_value_round_trips_through_parse() {
        for original in ["${vars.x} and $${y}", "plain", "$$${z}"] {
            let mut json = serde_json::json!({ "a": [original] });
            escape_json(&mut json);
            let escaped = json["a"][0].as_str().unwrap();
            assert_eq!(parse(escaped).unwrap(), [text(original)], "{original}");
        }
    }

    #[test]
    fn scalars_splice_as_text_and_nested_names_look_into_maps() {
        let vars: Dict = serde_norway::from_str("a: 3\nb: true\nc: { d: 0.5 }\n").unwrap();
        assert_eq!(as_text(lookup(&vars, "a").unwrap()).as_deref(), Some("3"));
        assert_eq!(
            as_text(lookup(&vars, "b").unwrap()).as_deref(),
            Some("true")
        );
        assert_eq!(
            as_text(lookup(&vars, "c.d").unwrap()).as_deref(),
            Some("0.5")
        );
        assert_eq!(as_text(lookup(&vars, "c").unwrap()), None);
        assert!(lookup(&vars, "c.e").is_none());
    }
}
