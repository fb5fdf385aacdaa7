//! Chat templates as Hugging Face runs them: a model's Jinja `chat_template` rendered
//! with minijinja the way transformers' `apply_chat_template` renders it, and the loss
//! mask of a conversation derived from the rendered text.
//!
//! transformers renders with Jinja2's sandboxed environment, `trim_blocks` and
//! `lstrip_blocks` on, the `loopcontrols` extension, its own `tojson` (Python's
//! `json.dumps`, not Jinja's HTML-safe one), `raise_exception` and `strftime_now`, and
//! passes `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's
//! special tokens (`bos_token`, `eos_token`, …) and any extra keyword arguments. This
//! module sets minijinja up the same way, adds Python's string and dict methods
//! (minijinja-contrib's pycompat), and prints values as Python's `str()` would (`True`,
//! `None`, `{'a': 1}`), because that is what a Jinja2 template shows.
//!
//! The rendered text is tokenized whole without added special tokens (the template
//! writes them), exactly as transformers does. Which tokens are trained on is decided
//! from character spans of the text:
//! - where the template marks them with `{% generation %}…{% endgeneration %}`, those
//!   spans, as transformers' `return_assistant_tokens_mask` takes them;
//! - otherwise, for every assistant turn, the text that rendering the conversation up to
//!   and including that turn adds to the rendering up to it with the generation prompt:
//!   the answer and its end-of-turn token(s), whatever the template (trailing
//!   whitespace after them is layout the model never produces, and is left out).
//!
//! A span covers every token from the one holding its first byte to the one holding its
//! last byte, as transformers' `char_to_token` does.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::path_error::AtPath;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

/// File name of the template beside a tokenizer, as transformers ≥ 4.43 saves it.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// The tokenizer's settings file that holds `chat_template` and the special tokens.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// Marks the start of a `{% generation %}` block in rendered text (a Unicode
/// noncharacter, which text never carries; rendering fails if it does).
const GENERATION_START: char = '\u{FDD0}';
/// Marks the end of a `{% generation %}` block.
const GENERATION_END: char = '\u{FDD1}';

/// The special-token keys transformers passes to every template (its
/// `special_tokens_map`), besides `additional_special_tokens`.
const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Errors of reading and rendering chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file could not be read.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathIoError),
    /// `tokenizer_config.json` is not what transformers writes.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The template does not compile.
    #[error("chat template {origin}: {message}")]
    Syntax {
        /// Where the template came from.
        origin: String,
        /// minijinja's message with the template line.
        message: String,
    },
    /// The template called `raise_exception(…)`: it refuses this conversation.
    #[error("chat template {origin} refused the conversation: {message}")]
    Raised {
        /// Where the template came from.
        origin: String,
        /// The template's own message.
        message: String,
    },
    /// Rendering failed for another reason (an undefined attribute, a type error).
    #[error("chat template {origin} cannot render the conversation: {message}")]
    Render {
        /// Where the template came from.
        origin: String,
        /// What went wrong, with the template line.
        message: String,
    },
    /// The template renders an earlier part of the conversation differently once later
    /// turns follow, so the assistant's tokens cannot be found by rendering prefixes.
    #[error(
        "chat template {origin}: rendering the conversation up to message {index} does not give a prefix of the whole conversation, so the assistant's tokens cannot be located; mark them with {{% generation %}}…{{% endgeneration %}} in the template"
    )]
    NotPrefixStable {
        /// Where the template came from.
        origin: String,
        /// The message index (0-based) where it happened.
        index: usize,
    },
    /// A conversation is not a list of messages with roles.
    #[error("{0}")]
    Conversation(String),
    /// A chat cache was rendered with another template than the model's own.
    #[error(
        "the chat cache {cache} was rendered with another chat template than the model's own ({template}); rebuild the cache with this model's tokenizer directory as its `tokenizer` input"
    )]
    Mismatch {
        /// The cache directory.
        cache: PathBuf,
        /// The model's template file (or the directory without one).
        template: PathBuf,
    },
}

/// A conversation as the template sees it: the messages (and tool definitions) exactly
/// as they were given, keys in their original order.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// The `messages` list.
    pub messages: Value,
    /// The `tools` list (JSON schemas), or none.
    pub tools: Value,
    /// The `documents` list (retrieval-augmented templates), or none.
    pub documents: Value,
}

impl Conversation {
    /// Reads `messages` (required), `tools` and `documents` from one JSON object (a
    /// line of a chat JSONL file), keeping every key of every message.
    pub fn from_json(text: &str) -> Result<Conversation, TemplateError> {
        let record: Value = serde_json::from_str(text)
            .map_err(|error| TemplateError::Conversation(error.to_string()))?;
        Conversation::from_record(&record)
    }

    /// The conversation in an already parsed record.
    pub fn from_record(record: &Value) -> Result<Conversation, TemplateError> {
        let messages = record
            .get_attr("messages")
            .map_err(|error| TemplateError::Conversation(error.to_string()))?;
        if messages.kind() != ValueKind::Seq {
            return Err(TemplateError::Conversation(
                "a conversation needs `messages`, a list".to_string(),
            ));
        }
        let optional = |key: &str| match record.get_attr(key) {
            Ok(value) if !value.is_undefined() => value,
            _ => Value::from(()),
        };
        let conversation = Conversation {
            messages: as_transformers_passes(messages),
            tools: optional("tools"),
            documents: optional("documents"),
        };
        for index in 0..conversation.len() {
            conversation.role(index)?;
        }
        Ok(conversation)
    }

    /// A conversation of `messages` (JSON values) without tools.
    pub fn from_messages(messages: &serde_json::Value) -> Result<Conversation, TemplateError> {
        let record: Value = serde_json::from_value(serde_json::json!({ "messages": messages }))
            .map_err(|error| TemplateError::Conversation(error.to_string()))?;
        Conversation::from_record(&record)
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len().unwrap_or(0)
    }

    /// Whether there are no messages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `role` of message `index`.
    pub fn role(&self, index: usize) -> Result<String, TemplateError> {
        let message = self
            .messages
            .get_item_by_index(index)
            .map_err(|error| TemplateError::Conversation(error.to_string()))?;
        match message.get_attr("role") {
            Ok(role) if role.kind() == ValueKind::String => {
                Ok(role.as_str().unwrap_or_default().to_string())
            }
            _ => Err(TemplateError::Conversation(format!(
                "message {index} has no `role` string"
            ))),
        }
    }

    /// The first `count` messages, with the same tools.
    fn prefix(&self, count: usize) -> Conversation {
        let messages: Vec<Value> = (0..count)
            .filter_map(|index| self.messages.get_item_by_index(index).ok())
            .collect();
        Conversation {
            messages: Value::from(messages),
            tools: self.tools.clone(),
            documents: self.documents.clone(),
        }
    }
}

/// `messages` as transformers hands them to a template: keys whose value is null are
/// dropped (`"content": null` is then undefined, not none), and trainyard's
/// `{"name", "arguments"}` tool calls take the OpenAI shape transformers documents,
/// `{"type": "function", "function": {"name", "arguments"}}`, which templates such as
/// Llama 3.1's read. Everything else is kept as given, in order.
fn as_transformers_passes(messages: Value) -> Value {
    let Ok(items) = messages.try_iter() else {
        return messages;
    };
    let rebuilt: Vec<Value> = items
        .map(|message| {
            let Ok(keys) = message.try_iter() else {
                return message;
            };
            let fields: Vec<(Value, Value)> = keys
                .filter_map(|key| {
                    let value = message.get_item(&key).ok()?;
                    if value.is_none() {
                        return None;
                    }
                    if key.as_str() == Some("tool_calls") && value.kind() == ValueKind::Seq {
                        let calls: Vec<Value> = value
                            .try_iter()
                            .map(|calls| calls.map(openai_tool_call).collect())
                            .unwrap_or_default();
                        return Some((key, Value::from(calls)));
                    }
                    Some((key, value))
                })
                .collect();
            map_value(fields)
        })
        .collect();
    Value::from(rebuilt)
}

fn openai_tool_call(call: Value) -> Value {
    if !call.get_attr("function").is_ok_and(|f| f.is_undefined()) {
        return call;
    }
    let function: Vec<(&str, Value)> = ["name", "arguments"]
        .into_iter()
        .filter_map(|key| {
            call.get_attr(key)
                .ok()
                .filter(|value| !value.is_undefined())
                .map(|value| (key, value))
        })
        .collect();
    let mut fields: Vec<(&str, Value)> = Vec::new();
    if let Ok(id) = call.get_attr("id")
        && !id.is_undefined()
    {
        fields.push(("id", id));
    }
    fields.push(("type", Value::from("function")));
    fields.push(("function", map_value(function)));
    map_value(fields)
}

/// A map value keeping the order of `fields`.
fn map_value<K: Into<Value>>(fields: Vec<(K, Value)>) -> Value {
    Value::from(
        fields
            .into_iter()
            .map(|(key, value)| (key.into(), value))
            .collect::<indexmap::IndexMap<Value, Value>>(),
    )
}

/// Rendered text and the byte spans the template marked as generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The text, special tokens written out.
    pub text: String,
    /// Byte ranges of `{% generation %}` blocks, in order.
    pub generation: Vec<Range<usize>>,
}

/// Where a template came from, for messages and cache records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model's own (`tokenizer_config.json` or `chat_template.jinja`).
    Model(PathBuf),
    /// trainyard's template for its own tokenizers.
    Trainyard,
    /// A `.jinja` file the pipeline names.
    File(PathBuf),
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateSource::Model(path) | TemplateSource::File(path) => {
                write!(f, "{}", path.display())
            }
            TemplateSource::Trainyard => write!(f, "trainyard's own"),
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    source: TemplateSource,
    text: String,
    has_generation: bool,
    special_tokens: Vec<(String, Value)>,
    extra: Vec<(String, Value)>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("has_generation", &self.has_generation)
            .finish()
    }
}

/// The special tokens and template of a tokenizer directory's `tokenizer_config.json`.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// The file read (for messages).
    pub path: PathBuf,
    /// `chat_template`: the default template's text, if any.
    pub chat_template: Option<String>,
    /// Named templates (`chat_template` given as a list), other than `default`.
    pub named_templates: BTreeMap<String, String>,
    /// Special tokens by key (`bos_token` → `<s>`), as transformers passes them.
    pub special_tokens: Vec<(String, String)>,
    /// `additional_special_tokens`.
    pub additional_special_tokens: Vec<String>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`; a missing file gives an empty config.
    pub fn load(dir: &Path) -> Result<TokenizerConfig, TemplateError> {
        let path = dir.join(TOKENIZER_CONFIG);
        if !path.is_file() {
            return Ok(TokenizerConfig {
                path,
                ..TokenizerConfig::default()
            });
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| TemplateError::Config {
                path: path.clone(),
                message: error.to_string(),
            })?;
        let mut config = TokenizerConfig {
            path: path.clone(),
            ..TokenizerConfig::default()
        };
        match value.get("chat_template") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(text)) => config.chat_template = Some(text.clone()),
            Some(serde_json::Value::Array(templates)) => {
                for entry in templates {
                    let (Some(name), Some(template)) = (
                        entry.get("name").and_then(serde_json::Value::as_str),
                        entry.get("template").and_then(serde_json::Value::as_str),
                    ) else {
                        return Err(TemplateError::Config {
                            path,
                            message: "key `chat_template`: each entry of the list needs `name` and `template` strings".to_string(),
                        });
                    };
                    if name == "default" {
                        config.chat_template = Some(template.to_string());
                    } else {
                        config
                            .named_templates
                            .insert(name.to_string(), template.to_string());
                    }
                }
            }
            Some(_) => {
                return Err(TemplateError::Config {
                    path,
                    message: "key `chat_template`: expected a string or a list of {name, template}"
                        .to_string(),
                });
            }
        }
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(token) = value.get(*key).and_then(token_content) {
                config.special_tokens.push((key.to_string(), token));
            }
        }
        if let Some(list) = value
            .get("additional_special_tokens")
            .or_else(|| value.get("extra_special_tokens"))
            .and_then(serde_json::Value::as_array)
        {
            config.additional_special_tokens = list.iter().filter_map(token_content).collect();
        }
        Ok(config)
    }

    /// The special token under `key` (`eos_token`, …), if set.
    pub fn special(&self, key: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, token)| token.as_str())
    }
}

/// A token written as a string or as an AddedToken object `{"content": …}`.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(token) => Some(token.clone()),
        serde_json::Value::Object(object) => object
            .get("content")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// Files that travel with a model's `tokenizer.json` from elsewhere: its template,
/// special tokens and stop tokens. Every model directory trainyard writes from such a
/// base carries them, so the model keeps speaking its own format after training.
pub const COMPANION_FILES: &[&str] = &[
    TOKENIZER_CONFIG,
    TEMPLATE_FILE,
    "special_tokens_map.json",
    "generation_config.json",
];

/// Copies the [`COMPANION_FILES`] that sit beside `tokenizer_file` into `dir`; returns
/// the names copied.
pub fn copy_companions(tokenizer_file: &Path, dir: &Path) -> std::io::Result<Vec<&'static str>> {
    let from = tokenizer_dir(tokenizer_file);
    let mut copied = Vec::new();
    for name in COMPANION_FILES {
        let source = from.join(name);
        let target = dir.join(name);
        if source.is_file() && source != target {
            std::fs::copy(&source, &target)?;
            copied.push(*name);
        }
    }
    Ok(copied)
}

/// Checks that the model whose tokenizer is `tokenizer_file` has the template hashed
/// as `expected` (a chat cache's record), so that training never teaches a model a
/// format other than the one it will be prompted with.
pub fn verify_model_template(
    tokenizer_file: &Path,
    expected: &str,
    cache: &Path,
) -> Result<(), TemplateError> {
    let dir = tokenizer_dir(tokenizer_file);
    let config = TokenizerConfig::load(&dir)?;
    let mismatch = |template: PathBuf| TemplateError::Mismatch {
        cache: cache.to_path_buf(),
        template,
    };
    match model_template_text(&dir, &config)? {
        Some((text, path)) => {
            let template = ChatTemplate::new(
                TemplateSource::Model(path.clone()),
                &text,
                &config,
                Vec::new(),
            )?;
            if template.hash() == expected {
                Ok(())
            } else {
                Err(mismatch(path))
            }
        }
        None => Err(mismatch(dir)),
    }
}

/// Which template renders conversations.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TemplateChoice {
    /// The tokenizer's own template when it has one (`chat_template.jinja` or
    /// `tokenizer_config.json`), else trainyard's for a tokenizer with trainyard's role
    /// tokens.
    #[default]
    Auto,
    /// The tokenizer's own template; an error when it has none.
    Model,
    /// trainyard's template (`<|user|>…<|end|>`), for tokenizers a `tokenizer` stage
    /// trained.
    Trainyard,
}

/// The directory a tokenizer input names: the directory itself, or the one holding a
/// `tokenizer.json` file.
pub fn tokenizer_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

impl ChatTemplate {
    /// The template for the tokenizer at `tokenizer_path` (a file or a directory):
    /// `file` when given, else as `choice` says. `has_trainyard_tokens` tells whether
    /// the tokenizer carries trainyard's role tokens (what `auto` falls back on).
    pub fn for_tokenizer(
        tokenizer_path: &Path,
        choice: TemplateChoice,
        file: Option<&Path>,
        has_trainyard_tokens: bool,
        extra: Vec<(String, Value)>,
    ) -> Result<ChatTemplate, TemplateError> {
        let dir = tokenizer_dir(tokenizer_path);
        let config = TokenizerConfig::load(&dir)?;
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).at(file)?;
            return ChatTemplate::new(
                TemplateSource::File(file.to_path_buf()),
                &text,
                &config,
                extra,
            );
        }
        let own = model_template_text(&dir, &config)?;
        match (choice, own) {
            (TemplateChoice::Auto | TemplateChoice::Model, Some((text, path))) => {
                ChatTemplate::new(TemplateSource::Model(path), &text, &config, extra)
            }
            (TemplateChoice::Trainyard, _) | (TemplateChoice::Auto, None) if has_trainyard_tokens => {
                let mut template = ChatTemplate::trainyard()?;
                template.extra = extra;
                Ok(template)
            }
            (TemplateChoice::Trainyard, _) => Err(TemplateError::Config {
                path: tokenizer_path.to_path_buf(),
                message: "`chat_template: trainyard` needs a tokenizer with trainyard's role tokens (`<|user|>`, `<|assistant|>`, `<|end|>`, …), as a `tokenizer` stage trains them".to_string(),
            }),
            (_, None) => Err(TemplateError::Config {
                path: dir.clone(),
                message: format!(
                    "this tokenizer has no chat template (looked for {} and `chat_template` in {}); give one with `inputs: {{ chat_template: FILE.jinja }}`",
                    dir.join(TEMPLATE_FILE).display(),
                    config.path.display()
                ),
            }),
        }
    }
}

/// The template text of a model or tokenizer directory, as transformers finds it:
/// `chat_template.jinja` first, then `tokenizer_config.json`'s `chat_template`.
pub fn model_template_text(
    dir: &Path,
    config: &TokenizerConfig,
) -> Result<Option<(String, PathBuf)>, TemplateError> {
    let file = dir.join(TEMPLATE_FILE);
    if file.is_file() {
        let text = std::fs::read_to_string(&file).at(&file)?;
        return Ok(Some((text, file)));
    }
    Ok(config
        .chat_template
        .clone()
        .map(|text| (text, config.path.clone())))
}

impl ChatTemplate {
    /// Compiles `text` (from `source`), rendered with `config`'s special tokens and
    /// the extra template variables `extra` (transformers' `**kwargs`).
    pub fn new(
        source: TemplateSource,
        text: &str,
        config: &TokenizerConfig,
        extra: Vec<(String, Value)>,
    ) -> Result<ChatTemplate, TemplateError> {
        let (rewritten, has_generation) = rewrite_generation_tags(text);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|error| TemplateError::Syntax {
                    origin: source.to_string(),
                    message: error.to_string(),
                })?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            if value.is_undefined() {
                return Ok(());
            }
            out.write_str(&python_str(value))
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write"))
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat_template", rewritten)
            .map_err(|error| TemplateError::Syntax {
                origin: source.to_string(),
                message: describe(&error),
            })?;
        let mut special_tokens: Vec<(String, Value)> = config
            .special_tokens
            .iter()
            .map(|(key, token)| (key.clone(), Value::from(token.as_str())))
            .collect();
        if !config.additional_special_tokens.is_empty() {
            special_tokens.push((
                "additional_special_tokens".to_string(),
                Value::from(config.additional_special_tokens.clone()),
            ));
        }
        Ok(ChatTemplate {
            source,
            text: text.to_string(),
            has_generation,
            special_tokens,
            extra,
            env,
        })
    }

    /// trainyard's own template (for tokenizers a `tokenizer` stage trained).
    pub fn trainyard() -> Result<ChatTemplate, TemplateError> {
        let config = TokenizerConfig {
            special_tokens: vec![
                (
                    "bos_token".to_string(),
                    super::special::END_OF_TEXT.to_string(),
                ),
                (
                    "eos_token".to_string(),
                    super::special::END_OF_TURN.to_string(),
                ),
                ("pad_token".to_string(), super::special::PAD.to_string()),
            ],
            ..TokenizerConfig::default()
        };
        ChatTemplate::new(
            TemplateSource::Trainyard,
            super::chat::JINJA_TEMPLATE,
            &config,
            Vec::new(),
        )
    }

    /// Where the template came from.
    pub fn source(&self) -> &TemplateSource {
        &self.source
    }

    /// The template's text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the template marks assistant text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// A hash of the template text and the special tokens it is rendered with, recorded
    /// in chat caches so that training can check the cache against its base model (the
    /// extra variables are part of the cache stage's settings instead).
    pub fn hash(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.text.as_bytes());
        for (key, value) in &self.special_tokens {
            hasher.update(b"\0");
            hasher.update(key.as_bytes());
            hasher.update(b"=");
            hasher.update(python_str(value).as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Renders `conversation` as `apply_chat_template(…, tokenize=False)` does.
    pub fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<Rendered, TemplateError> {
        let mut context: Vec<(String, Value)> = vec![
            ("messages".to_string(), conversation.messages.clone()),
            ("tools".to_string(), conversation.tools.clone()),
            ("documents".to_string(), conversation.documents.clone()),
            (
                "add_generation_prompt".to_string(),
                Value::from(add_generation_prompt),
            ),
        ];
        context.extend(self.special_tokens.iter().cloned());
        context.extend(self.extra.iter().cloned());
        let context = Value::from(context.into_iter().collect::<BTreeMap<String, Value>>());
        let template =
            self.env
                .get_template("chat_template")
                .map_err(|error| TemplateError::Syntax {
                    origin: self.source.to_string(),
                    message: describe(&error),
                })?;
        let raw = template.render(context).map_err(|error| {
            if let Some(message) = raised_message(&error) {
                TemplateError::Raised {
                    origin: self.source.to_string(),
                    message,
                }
            } else {
                TemplateError::Render {
                    origin: self.source.to_string(),
                    message: describe(&error),
                }
            }
        })?;
        self.strip_markers(raw)
    }

    /// Removes the generation markers, recording where they were.
    fn strip_markers(&self, raw: String) -> Result<Rendered, TemplateError> {
        if !self.has_generation {
            if raw.contains([GENERATION_START, GENERATION_END]) {
                return Err(self.marker_in_text());
            }
            return Ok(Rendered {
                text: raw,
                generation: Vec::new(),
            });
        }
        let mut text = String::with_capacity(raw.len());
        let mut generation = Vec::new();
        let mut open: Option<usize> = None;
        for character in raw.chars() {
            match character {
                GENERATION_START => {
                    if open.is_some() {
                        return Err(self.marker_in_text());
                    }
                    open = Some(text.len());
                }
                GENERATION_END => match open.take() {
                    Some(start) => generation.push(start..text.len()),
                    None => return Err(self.marker_in_text()),
                },
                other => text.push(other),
            }
        }
        if open.is_some() {
            return Err(self.marker_in_text());
        }
        Ok(Rendered { text, generation })
    }

    fn marker_in_text(&self) -> TemplateError {
        TemplateError::Render {
            origin: self.source.to_string(),
            message: "the conversation contains the Unicode noncharacters U+FDD0/U+FDD1, which trainyard reserves to mark generation blocks".to_string(),
        }
    }

    /// Byte spans of the text rendered for `conversation` that the model is trained on:
    /// the template's generation blocks, or else each assistant turn found by rendering
    /// growing prefixes (see the module documentation).
    pub fn trainable_spans(
        &self,
        conversation: &Conversation,
        full: &Rendered,
    ) -> Result<Vec<Range<usize>>, TemplateError> {
        if self.has_generation {
            return Ok(full.generation.clone());
        }
        let mut spans = Vec::new();
        for index in 0..conversation.len() {
            if conversation.role(index)? != "assistant" {
                continue;
            }
            let before = self.render(&conversation.prefix(index), true)?.text;
            let through = self.render(&conversation.prefix(index + 1), false)?.text;
            if !through.starts_with(&before) || !full.text.starts_with(&through) {
                return Err(TemplateError::NotPrefixStable {
                    origin: self.source.to_string(),
                    index,
                });
            }
            let end = before.len() + through[before.len()..].trim_end().len();
            if end > before.len() {
                spans.push(before.len()..end);
            }
        }
        Ok(spans)
    }
}

/// The tokens covered by byte `spans` of a text whose tokens have byte `offsets`: from
/// the token holding a span's first byte to the token holding its last, as
/// transformers' `char_to_token` marks them.
pub fn span_mask(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    for span in spans {
        if span.is_empty() {
            continue;
        }
        let holding = |byte: usize| {
            offsets
                .iter()
                .position(|&(start, end)| start <= byte && byte < end)
        };
        let Some(first) = holding(span.start).or_else(|| {
            offsets
                .iter()
                .position(|&(start, end)| end > span.start && start < span.end)
        }) else {
            continue;
        };
        let last = holding(span.end - 1)
            .or_else(|| {
                offsets
                    .iter()
                    .rposition(|&(start, end)| start < span.end && end > span.start)
            })
            .unwrap_or(first);
        for flag in mask.iter_mut().take(last + 1).skip(first) {
            *flag = 1;
        }
    }
    mask
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (an extension of transformers,
/// unknown to minijinja) by expressions printing marker characters, keeping the
/// whitespace control the tags had: `-` on either side, `trim_blocks` (one newline
/// after the tag) and `lstrip_blocks` (blanks before the tag on its line) are applied
/// to the surrounding text here, since an expression tag has neither.
fn rewrite_generation_tags(text: &str) -> (String, bool) {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(open) = rest.find("{%") {
        let after_open = &rest[open + 2..];
        let Some(close) = after_open.find("%}") else {
            break;
        };
        let inner = &after_open[..close];
        let left = inner.chars().next().filter(|c| *c == '-' || *c == '+');
        let right = inner
            .chars()
            .last()
            .filter(|c| (*c == '-' || *c == '+') && inner.len() > 1);
        let word = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let marker = match word {
            "generation" => GENERATION_START,
            "endgeneration" => GENERATION_END,
            _ => {
                out.push_str(&rest[..open + 2 + close + 2]);
                rest = &after_open[close + 2..];
                continue;
            }
        };
        found = true;
        let mut before = &rest[..open];
        match left {
            Some('-') => before = before.trim_end(),
            Some('+') => {}
            _ => {
                // lstrip_blocks: blanks between the line start and the tag go.
                let line_start = before.rfind('\n').map_or(0, |index| index + 1);
                let on_line = &before[line_start..];
                let at_text_start = line_start == 0 && out.is_empty();
                if (line_start > 0 || at_text_start)
                    && on_line.chars().all(|c| c == ' ' || c == '\t')
                {
                    before = &before[..line_start];
                }
            }
        }
        out.push_str(before);
        out.push_str(&format!("{{{{ \"\\u{:04X}\" }}}}", marker as u32));
        let mut after = &after_open[close + 2..];
        match right {
            Some('-') => after = after.trim_start(),
            Some('+') => {}
            _ => {
                // trim_blocks: the first newline after a block tag goes.
                after = after
                    .strip_prefix("\r\n")
                    .or_else(|| after.strip_prefix('\n'))
                    .unwrap_or(after);
            }
        }
        rest = after;
    }
    out.push_str(rest);
    (out, found)
}

/// The text of an error raised by `raise_exception`, if `error` is one.
fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(error) = error.downcast_ref::<minijinja::Error>()
            && error.kind() == ErrorKind::InvalidOperation
            && let Some(detail) = error.detail()
            && let Some(message) = detail.strip_prefix(RAISED_PREFIX)
        {
            return Some(message.to_string());
        }
        current = error.source();
    }
    None
}

const RAISED_PREFIX: &str = "raise_exception: ";

/// minijinja's error with the template name and line.
fn describe(error: &minijinja::Error) -> String {
    let mut message = match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    };
    if let Some(line) = error.line() {
        message.push_str(&format!(" (template line {line})"));
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!("; {cause}"));
        source = cause.source();
    }
    message
}

/// The template function `raise_exception(message)`.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_PREFIX}{message}"),
    ))
}

/// The template function `strftime_now(format)`: today's date (UTC) formatted with the
/// common `strftime` codes, as transformers provides it. Templates that print a date
/// (Llama 3.1's "Today Date") therefore depend on the day they are rendered; give
/// `date_string` among the template variables to pin it.
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(&format, seconds)))
}

/// `format` with `%d %m %Y %y %b %B %a %A %H %M %S %j %e %%` filled in for the UTC
/// time `seconds` after the Unix epoch.
pub fn strftime(format: &str, seconds: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", second_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", second_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", second_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The `tojson` filter as transformers defines it: Python's
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(value) if value.is_none() => None,
        Some(value) => match value.as_usize() {
            Some(width) => Some(" ".repeat(width)),
            None => Some(value.as_str().unwrap_or_default().to_string()),
        },
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let separators = match separators {
        Some(pair) if !pair.is_none() => {
            let item = pair.get_item_by_index(0)?;
            let key = pair.get_item_by_index(1)?;
            Some((
                item.as_str().unwrap_or(", ").to_string(),
                key.as_str().unwrap_or(": ").to_string(),
            ))
        }
        _ => None,
    };
    kwargs.assert_all_used()?;
    let options = JsonOptions {
        item_separator: separators.as_ref().map_or_else(
            || if indent.is_some() { "," } else { ", " }.to_string(),
            |(item, _)| item.clone(),
        ),
        key_separator: separators.map_or_else(|| ": ".to_string(), |(_, key)| key),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    python_json(value, &options, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOptions {
    item_separator: String,
    key_separator: String,
    indent: Option<String>,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Writes `value` as Python's `json.dumps` would.
fn python_json(
    value: &Value,
    options: &JsonOptions,
    level: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &options.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: Object of type Undefined is not JSON serializable",
            ));
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), options, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(out, level + 1);
                python_json(item, options, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort_by_key(python_str);
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (index, key) in keys.iter().enumerate() {
                if index > 0 {
                    out.push_str(&options.item_separator);
                }
                newline(out, level + 1);
                let name = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
                    _ => python_str(key),
                };
                json_string(&name, options, out);
                out.push_str(&options.key_separator);
                python_json(&value.get_item(key)?, options, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => json_string(&value.to_string(), options, out),
    }
    Ok(())
}

/// A JSON string literal with Python's escapes (`ensure_ascii` escapes all non-ASCII).
fn json_string(text: &str, options: &JsonOptions, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (options.ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python prints it: integers as digits, floats by `repr`.
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(float) => super::chat::python_float(float),
        Err(_) => value.to_string(),
    }
}

/// A value as Python's `str()` prints it, which is what Jinja2 writes for `{{ x }}`:
/// `True`/`False`/`None`, float `repr`, and containers with their items' `repr`.
pub fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => python_repr(value),
    }
}

/// Python's `repr` of a value.
fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number => python_number(value),
        ValueKind::String => python_string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = value
                .try_iter()
                .map(|items| items.map(|item| python_repr(&item)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let entries: Vec<String> = value
                .try_iter()
                .map(|keys| {
                    keys.map(|key| {
                        let item = value.get_item(&key).unwrap_or_default();
                        format!("{}: {}", python_repr(&key), python_repr(&item))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", entries.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Python's `repr` of a string: single quotes unless the text has a single quote and
/// no double quote.
fn python_string_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> ChatTemplate {
        let config = TokenizerConfig {
            special_tokens: vec![("eos_token".to_string(), "</s>".to_string())],
            ..TokenizerConfig::default()
        };
        ChatTemplate::new(
            TemplateSource::File(PathBuf::from("test.jinja")),
            text,
            &config,
            Vec::new(),
        )
        .unwrap()
    }

    fn conversation(json: &str) -> Conversation {
        Conversation::from_json(json).unwrap()
    }

    #[test]
    fn values_print_as_python_prints_them() {
        let t = template("{{ messages[0].x }}|{{ none }}|{{ true }}|{{ 1.0 }}|{{ 1e-7 }}");
        let c =
            conversation(r#"{"messages": [{"role": "user", "x": {"b": [1, "it's"], "a": null}}]}"#);
        assert_eq!(
            t.render(&c, false).unwrap().text,
            "{'b': [1, \"it's\"], 'a': None}|None|True|1.0|1e-07"
        );
    }

    #[test]
    fn tojson_is_pythons_json_dumps_keeping_key_order() {
        let t = template(
            "{{ messages[0].x | tojson }}|{{ messages[0].x | tojson(indent=2) }}|{{ messages[0].x | tojson(sort_keys=true) }}",
        );
        let c =
            conversation(r#"{"messages": [{"role": "user", "x": {"b": [1, 2.5], "a": "é<"}}]}"#);
        assert_eq!(
            t.render(&c, false).unwrap().text,
            "{\"b\": [1, 2.5], \"a\": \"é<\"}|{\n  \"b\": [\n    1,\n    2.5\n  ],\n  \"a\": \"é<\"\n}|{\"a\": \"é<\", \"b\": [1, 2.5]}"
        );
    }

    #[test]
    fn trainyard_tool_calls_are_passed_in_openai_shape() {
        let t = template(
            "{% for call in messages[0].tool_calls %}{{ call.type }} {{ call.function.name }} {{ call.function.arguments | tojson }}{% endfor %}",
        );
        let c = conversation(
            r#"{"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"z": 1, "a": 2}}]}]}"#,
        );
        assert_eq!(
            t.render(&c, false).unwrap().text,
            "function f {\"z\": 1, \"a\": 2}"
        );
    }

    #[test]
    fn raise_exception_is_reported_with_its_message() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        let error = t
            .render(&conversation(r#"{"messages": []}"#), false)
            .unwrap_err();
        assert!(
            matches!(&error, TemplateError::Raised { message, .. } if message == "roles must alternate"),
            "{error}"
        );
    }

    #[test]
    fn generation_blocks_become_spans_with_whitespace_control_kept() {
        let text = "{% for m in messages %}{% if m.role == 'assistant' %}A:\n  {% generation %}\n{{ m.content }}{{ eos_token }}{% endgeneration %}\n{% else %}U:{{ m.content }}\n{% endif %}{% endfor %}";
        let t = template(text);
        assert!(t.has_generation_blocks());
        let c = conversation(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        );
        let rendered = t.render(&c, false).unwrap();
        assert_eq!(rendered.text, "U:hi\nA:\nyo</s>");
        assert_eq!(&rendered.text[rendered.generation[0].clone()], "yo</s>");
    }

    #[test]
    fn prefix_rendering_finds_the_answer_and_its_end_of_turn() {
        let t = template(
            "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        );
        let c = conversation(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]}"#,
        );
        let full = t.render(&c, false).unwrap();
        let spans = t.trainable_spans(&c, &full).unwrap();
        let texts: Vec<&str> = spans.iter().map(|s| &full.text[s.clone()]).collect();
        assert_eq!(texts, ["yo<|end|>", "ok<|end|>"]);
    }

    #[test]
    fn span_mask_covers_tokens_holding_first_to_last_byte() {
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9)];
        let (middle, last) = (3..6, 6..9);
        assert_eq!(
            span_mask(&offsets, std::slice::from_ref(&middle)),
            [0, 1, 1, 0]
        );
        assert_eq!(
            span_mask(&offsets, std::slice::from_ref(&last)),
            [0, 0, 0, 1]
        );
        assert_eq!(span_mask(&offsets, &[middle, last]), [0, 1, 1, 1]);
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let seconds = 1_721_997_296;
        assert_eq!(
            strftime("%d %b %Y|%A %H:%M:%S|%j|%B %e|%%", seconds),
            "26 Jul 2024|Friday 12:34:56|208|July 26|%"
        );
    }
}
