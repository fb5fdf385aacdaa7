//! Loading existing Hugging Face `tokenizer.json` files (a model's own, or one trainyard
//! trained) and checking trainyard's special-token ids in them.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use tokenizers::Tokenizer;

use super::TokenizeError;
use super::special::SPECIAL_TOKENS;

/// Fails unless every special token has its fixed id.
pub fn check_special_ids(tokenizer: &Tokenizer) -> Result<(), TokenizeError> {
    for (expected, token) in SPECIAL_TOKENS.iter().enumerate() {
        let found = tokenizer.token_to_id(token);
        if found != Some(expected as u32) {
            return Err(TokenizeError::SpecialTokenId {
                token,
                expected: expected as u32,
                found,
            });
        }
    }
    Ok(())
}

/// The id of each of trainyard's special tokens in `tokenizer` (`None` where it lacks
/// one), in id order.
pub fn special_token_ids(tokenizer: &Tokenizer) -> IndexMap<String, Option<u32>> {
    SPECIAL_TOKENS
        .iter()
        .map(|token| (token.to_string(), tokenizer.token_to_id(token)))
        .collect()
}

/// The `tokenizer.json` file for `path`: the path itself, or `tokenizer.json` inside it
/// when it is a directory (a model or export directory).
pub fn tokenizer_file(path: &Path) -> Result<PathBuf, TokenizeError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let file = path.join("tokenizer.json");
    if file.is_file() {
        Ok(file)
    } else {
        Err(TokenizeError::Load {
            path: path.to_path_buf(),
            message: "a directory without tokenizer.json".to_string(),
        })
    }
}

/// Loads a Hugging Face `tokenizer.json` (BPE merges may be `"a b"` strings or
/// `["a", "b"]` pairs), or the one inside a directory.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, TokenizeError> {
    let file = tokenizer_file(path)?;
    let bytes = std::fs::read(&file).map_err(|error| TokenizeError::Load {
        path: file.clone(),
        message: error.to_string(),
    })?;
    let load_error = |message: String| TokenizeError::Load {
        path: file.clone(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|error| load_error(format!("not JSON: {error}")))?;
    if json.get("model").is_none() {
        return Err(load_error(
            "missing key `model`: not a Hugging Face tokenizer.json".to_string(),
        ));
    }
    Tokenizer::from_bytes(&bytes).map_err(|error| TokenizeError::Load {
        path: file.clone(),
        message: format!("not a usable Hugging Face tokenizer.json: {error}"),
    })
}
