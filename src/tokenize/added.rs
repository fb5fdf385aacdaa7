//! New special tokens on a model's tokenizer (`add_tokens:`), as transformers'
//! `tokenizer.add_special_tokens({"additional_special_tokens": [...]})` adds them: each
//! token not yet known gets the next free id, is never split or normalized, and is listed
//! in `tokenizer_config.json` the way the file already lists its special tokens
//! (`extra_special_tokens` in transformers 5, `additional_special_tokens` and
//! `added_tokens_decoder` in transformers 4). Tokens the tokenizer already knows keep
//! their ids.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::TokenizeError;
use super::learn::tokenizer_json;
use super::template::{COMPANION_FILES, TOKENIZER_CONFIG, tokenizer_dir};
pub use crate::data::token_cache::AddedToken;

/// Adds `tokens` to `tokenizer` as special tokens, in order; returns those that were new,
/// with their ids. An empty or repeated entry is an error.
pub fn add_special_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[String],
) -> Result<Vec<AddedToken>, TokenizeError> {
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(TokenizeError::Setting(format!(
                "`add_tokens[{index}]` is empty"
            )));
        }
        if tokens[..index].contains(token) {
            return Err(TokenizeError::Setting(format!(
                "`add_tokens` lists `{token}` twice"
            )));
        }
    }
    let mut added = Vec::new();
    for token in tokens {
        if tokenizer.token_to_id(token).is_some() {
            continue;
        }
        tokenizer
            .add_special_tokens([tokenizers::AddedToken::from(token.as_str(), true)])
            .map_err(|error| TokenizeError::Library {
                context: format!("adding `{token}`"),
                message: error.to_string(),
            })?;
        let id = tokenizer
            .token_to_id(token)
            .ok_or_else(|| TokenizeError::Library {
                context: format!("adding `{token}`"),
                message: "the tokenizer gave it no id".to_string(),
            })?;
        added.push(AddedToken {
            content: token.clone(),
            id,
        });
    }
    Ok(added)
}

/// Writes the extended `tokenizer` into `dir` as a tokenizer directory: `tokenizer.json`,
/// the companion files that sit beside `source` (its original `tokenizer.json`), and its
/// `tokenizer_config.json` listing `requested` (every token asked for) and `added`.
/// Returns the path of the new `tokenizer.json`.
pub fn write_extended(
    tokenizer: &Tokenizer,
    source: &Path,
    requested: &[String],
    added: &[AddedToken],
    dir: &Path,
) -> Result<PathBuf, TokenizeError> {
    let io_error = |path: &Path, error: std::io::Error| TokenizeError::Load {
        path: path.to_path_buf(),
        message: error.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|error| io_error(dir, error))?;
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, tokenizer_json(tokenizer)?).map_err(|error| io_error(&file, error))?;
    let from = tokenizer_dir(source);
    for name in COMPANION_FILES {
        let path = from.join(name);
        if !path.is_file() {
            continue;
        }
        let target = dir.join(name);
        if *name == TOKENIZER_CONFIG {
            let text = std::fs::read_to_string(&path).map_err(|error| io_error(&path, error))?;
            let mut config: Value =
                serde_json::from_str(&text).map_err(|error| TokenizeError::Load {
                    path: path.clone(),
                    message: format!("not JSON: {error}"),
                })?;
            list_special_tokens(&mut config, requested, added);
            let mut text =
                serde_json::to_string_pretty(&config).map_err(|error| TokenizeError::Library {
                    context: "writing tokenizer_config.json".to_string(),
                    message: error.to_string(),
                })?;
            text.push('\n');
            std::fs::write(&target, text).map_err(|error| io_error(&target, error))?;
        } else {
            std::fs::copy(&path, &target).map_err(|error| io_error(&target, error))?;
        }
    }
    Ok(file)
}

/// Records the new special tokens in a `tokenizer_config.json` value the way its
/// transformers version does: entries in `added_tokens_decoder` when it has that map,
/// and the tokens appended to `additional_special_tokens` when it has that list, else to
/// `extra_special_tokens` (created when missing; left alone when it is a map of named
/// tokens, whose names `add_tokens` cannot know).
fn list_special_tokens(config: &mut Value, requested: &[String], added: &[AddedToken]) {
    let Some(config) = config.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(decoder)) = config.get_mut("added_tokens_decoder") {
        for token in added {
            decoder.insert(
                token.id.to_string(),
                json!({
                    "content": token.content,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            );
        }
    }
    let key = if config.contains_key("additional_special_tokens") {
        "additional_special_tokens"
    } else {
        "extra_special_tokens"
    };
    let list = config.entry(key).or_insert_with(|| json!([]));
    if let Value::Array(items) = list {
        for token in requested {
            if !items.iter().any(|item| item.as_str() == Some(token)) {
                items.push(json!(token));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        let json = r#"{
            "version": "1.0",
            "added_tokens": [{"id": 3, "content": "<s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2, "<s>": 3},
                      "unk_token": "[UNK]"}
        }"#;
        Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    #[test]
    fn new_tokens_get_the_next_ids_and_are_never_split() {
        let mut tokenizer = tiny_tokenizer();
        let tokens = [
            "<tool>".to_string(),
            "<s>".to_string(),
            "</tool>".to_string(),
        ];
        let added = add_special_tokens(&mut tokenizer, &tokens).unwrap();
        assert_eq!(
            added,
            vec![
                AddedToken {
                    content: "<tool>".into(),
                    id: 4
                },
                AddedToken {
                    content: "</tool>".into(),
                    id: 5
                }
            ]
        );
        let ids = tokenizer.encode("a<tool>b </tool>", false).unwrap();
        assert_eq!(ids.get_ids(), &[0, 4, 1, 5]);
        assert_eq!(tokenizer.get_vocab_size(true), 6);
    }

    #[test]
    fn bad_lists_are_refused() {
        let mut tokenizer = tiny_tokenizer();
        let twice = ["<x>".to_string(), "<x>".to_string()];
        let error = add_special_tokens(&mut tokenizer, &twice).unwrap_err();
        assert!(error.to_string().contains("twice"), "{error}");
        let empty = [String::new()];
        let error = add_special_tokens(&mut tokenizer, &empty).unwrap_err();
        assert!(error.to_string().contains("add_tokens[0]"), "{error}");
    }

    #[test]
    fn tokenizer_config_lists_them_as_its_transformers_version_does() {
        let added = [AddedToken {
            content: "<tool>".into(),
            id: 9,
        }];
        let requested = ["<tool>".to_string(), "<s>".to_string()];
        let mut v5 = json!({"eos_token": "<s>", "extra_special_tokens": ["<s>"]});
        list_special_tokens(&mut v5, &requested, &added);
        assert_eq!(v5["extra_special_tokens"], json!(["<s>", "<tool>"]));
        let mut v4 = json!({"added_tokens_decoder": {}, "additional_special_tokens": []});
        list_special_tokens(&mut v4, &requested, &added);
        assert_eq!(v4["additional_special_tokens"], json!(["<tool>", "<s>"]));
        assert_eq!(v4["added_tokens_decoder"]["9"]["special"], json!(true));
        assert!(v4.get("extra_special_tokens").is_none());
    }
}
