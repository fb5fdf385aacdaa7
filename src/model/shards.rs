//! The weight files of a Hugging Face model directory: one `model.safetensors`, or
//! shards `model-0000k-of-0000n.safetensors` listed in `model.safetensors.index.json`
//! (`metadata.total_size` and a `weight_map` from tensor name to shard file).
//!
//! Reading: [`safetensors_files`] finds the files (a shard the index lists but the
//! directory lacks is an error naming both), [`read_headers`] lists every tensor's name,
//! dtype and size from the headers alone. Writing: [`plan_shards`] groups tensors into
//! shards as transformers does, and [`write_index`] writes the index, so that export and
//! lora-merge can write one shard at a time and never hold the whole model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{Value, json};

use super::ModelError;
use crate::path_error::AtPath;

/// The single-file weights of a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// transformers 5's default `max_shard_size` of `save_pretrained`: 50 GB (decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// The safetensors files of an HF model directory: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`, in sorted order. A listed shard that does
/// not exist is [`ModelError::MissingShard`], found here before anything is loaded.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    let mut names: Vec<String> = read_weight_map(&index)?.into_values().collect();
    names.sort();
    names.dedup();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let file = dir.join(&name);
        if !file.is_file() {
            return Err(ModelError::MissingShard { index, shard: name });
        }
        files.push(file);
    }
    Ok(files)
}

/// The `weight_map` of an index file: tensor name → shard file name.
pub fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let text = std::fs::read_to_string(index).at(index)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|error| ModelError::json(index, error))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::missing_key(index, "weight_map"))?;
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(file) => Ok((name.clone(), file.to_string())),
            None => Err(ModelError::json(
                index,
                format!("key `weight_map.{name}`: expected a file name"),
            )),
        })
        .collect()
}

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorHeader {
    /// Its name.
    pub name: String,
    /// Index into the files given to [`read_headers`].
    pub file: usize,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorHeader {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes it takes in `dtype`.
    pub fn bytes_in(&self, dtype: DType) -> u64 {
        (self.elements() * dtype.size_in_bytes()) as u64
    }
}

/// Every tensor of `files`, from their headers alone, sorted by name.
pub fn read_headers(files: &[PathBuf]) -> Result<Vec<TensorHeader>, ModelError> {
    let mut headers = Vec::new();
    for (index, path) in files.iter().enumerate() {
        let (_, metadata) = read_metadata(path)?;
        for (name, info) in metadata.tensors() {
            let dtype = DType::try_from(info.dtype).map_err(|error| {
                ModelError::safetensors(path, format!("tensor `{name}`: {error}"))
            })?;
            headers.push(TensorHeader {
                name,
                file: index,
                dtype,
                shape: info.shape.clone(),
            });
        }
    }
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(headers)
}

/// The header of one safetensors file: its 8-byte length, then that much JSON.
fn read_metadata(path: &Path) -> Result<(usize, safetensors::tensor::Metadata), ModelError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).at(path)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).at(path)?;
    let length = u64::from_le_bytes(length) as usize;
    let bad = |message: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    if length > 100_000_000 {
        return Err(bad(format!(
            "header of {length} bytes is implausibly large"
        )));
    }
    let mut header = vec![0u8; length];
    file.read_exact(&mut header).at(path)?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|error| bad(format!("header: {error}")))?;
    Ok((length, metadata))
}

/// The names of every tensor in `files`.
pub fn tensor_names(files: &[PathBuf]) -> Result<BTreeSet<String>, ModelError> {
    Ok(read_headers(files)?
        .into_iter()
        .map(|header| header.name)
        .collect())
}

/// The dtype holding most bytes among `(dtype, bytes)` pairs (a model's dtype even when
/// a few small tensors differ); f32 when there are none.
pub fn main_dtype(tensors: impl IntoIterator<Item = (DType, usize)>) -> DType {
    let mut bytes: BTreeMap<&'static str, (DType, usize)> = BTreeMap::new();
    for (dtype, size) in tensors {
        bytes.entry(dtype.as_str()).or_insert((dtype, 0)).1 += size;
    }
    bytes
        .into_values()
        .max_by_key(|(_, size)| *size)
        .map_or(DType::F32, |(dtype, _)| dtype)
}

/// The file name of shard `k` (from 1) of `n`, as transformers names it.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Groups tensors (name, bytes), in the given order, into shards of at most
/// `max_bytes` as transformers does: a shard is closed when the next tensor would
/// overflow it, and a tensor bigger than the limit gets a shard of its own.
pub fn plan_shards(tensors: &[(String, u64)], max_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut size = 0u64;
    for (name, bytes) in tensors {
        if !current.is_empty() && size + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(name.clone());
        size += bytes;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes `dir/model.safetensors.index.json` with `metadata.total_size` (bytes of
/// tensor data) and the `weight_map`, keys sorted.
pub fn write_index(
    dir: &Path,
    total_size: u64,
    weight_map: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    let path = dir.join(INDEX_FILE);
    let value = json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    Ok(crate::path_error::write_json(&path, &value)?)
}
