//! A vocabulary grown by `add_tokens`: embedding tables with more rows, and PEFT's
//! trainable tokens.
//!
//! A new token's row starts as the mean of the table's original rows ([`grown_rows`]).
//! Fully fine-tuned, the grown table is simply a bigger parameter. A LoRA adapter keeps
//! the frozen table as it is and trains only the new tokens' rows, as PEFT's
//! `trainable_token_indices` does ([`TokenRows`]): the adapter holds those rows under
//! `…embed_tokens.token_adapter.trainable_tokens_delta` (their values, despite the
//! name), and ids past the end of the frozen table exist only there.

use candle_core::{D, DType, Result, Tensor};

/// The table `weight: [rows, hidden]` grown to `vocab` rows: the new rows, and the
/// existing rows of `ids`, set to the mean of the original rows; the rest unchanged.
pub fn grown_rows(weight: &Tensor, vocab: usize, ids: &[u32]) -> Result<Tensor> {
    let (rows, hidden) = weight.dims2()?;
    let dtype = weight.dtype();
    let mean = mean_row(weight)?;
    let grown = match vocab > rows {
        true => Tensor::cat(
            &[
                weight.to_dtype(DType::F32)?,
                mean.broadcast_as((vocab - rows, hidden))?.contiguous()?,
            ],
            0,
        )?,
        false => weight.to_dtype(DType::F32)?,
    };
    let values = mean.broadcast_as((ids.len(), hidden))?.contiguous()?;
    replace_rows(&grown, ids, &values)?.to_dtype(dtype)
}

/// The vocabulary a table of `table_rows` rows answers over once it holds rows for
/// `ids`: the table's rows, or up to the largest id.
pub fn grown_vocab<'a>(table_rows: usize, ids: impl IntoIterator<Item = &'a u32>) -> usize {
    ids.into_iter()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(table_rows)
}

/// The mean of the rows of `weight: [rows, hidden]`, as `[1, hidden]` in f32.
pub fn mean_row(weight: &Tensor) -> Result<Tensor> {
    weight.to_dtype(DType::F32)?.mean_keepdim(0)
}

/// `weight` with row `ids[i]` replaced by row `i` of `values` (PEFT's `index_copy`),
/// in `weight`'s dtype. Every id must be a row of `weight`.
pub fn replace_rows(weight: &Tensor, ids: &[u32], values: &Tensor) -> Result<Tensor> {
    let (rows, hidden) = weight.dims2()?;
    let (count, value_hidden) = values.dims2()?;
    if count != ids.len() || value_hidden != hidden {
        candle_core::bail!(
            "{count}×{value_hidden} token rows for {} ids of a table {rows}×{hidden}",
            ids.len()
        );
    }
    if let Some(id) = ids.iter().find(|&&id| id as usize >= rows) {
        candle_core::bail!("token id {id} is past the table's {rows} rows");
    }
    let mut data = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let values = values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for (id, row) in ids.iter().zip(values) {
        let start = *id as usize * hidden;
        data[start..start + hidden].copy_from_slice(&row);
    }
    Tensor::from_vec(data, (rows, hidden), weight.device())?.to_dtype(weight.dtype())
}

/// The rows of some token ids, replacing (or extending) a frozen table's: PEFT's
/// trainable tokens on an embedding, and on the head that is tied to it or mirrors it.
#[derive(Debug, Clone)]
pub struct TokenRows {
    ids: Vec<u32>,
    /// `[ids, hidden]`: a `Var`'s tensor while training.
    values: Tensor,
    /// Rows of the frozen table.
    table_rows: usize,
    /// `max(table_rows, max id + 1)`.
    vocab: usize,
    /// The ids are exactly `table_rows..vocab` in order: the head then appends their
    /// logits instead of scattering them.
    appended: bool,
}

impl TokenRows {
    /// Rows `values: [ids, hidden]` for `ids` (distinct) over a table of `table_rows` rows;
    /// every id past the table must be among `ids`.
    pub fn new(ids: Vec<u32>, values: Tensor, table_rows: usize) -> Result<TokenRows> {
        let (count, _) = values.dims2()?;
        if count != ids.len() {
            candle_core::bail!("{count} token rows for {} ids", ids.len());
        }
        let vocab = grown_vocab(table_rows, &ids);
        if let Some(missing) = (table_rows..vocab).find(|&id| !ids.contains(&(id as u32))) {
            candle_core::bail!(
                "token rows grow a table of {table_rows} rows to {vocab} but hold no row for id {missing}"
            );
        }
        let appended = ids
            .iter()
            .enumerate()
            .all(|(index, &id)| id as usize == table_rows + index)
            && vocab == table_rows + ids.len();
        Ok(TokenRows {
            ids,
            values,
            table_rows,
            vocab,
            appended,
        })
    }

    /// The vocabulary the rows extend the table to.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Embeddings `[…, hidden]` of `ids: […]`: `lookup` (the frozen table's lookup) for
    /// the ids it holds, this overlay's rows for its own.
    pub fn embed(
        &self,
        ids: &Tensor,
        lookup: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let mut table_ids = Vec::with_capacity(flat.len());
        let mut local = Vec::with_capacity(flat.len());
        let mut selected = Vec::with_capacity(flat.len());
        for &id in &flat {
            match self.ids.iter().position(|&own| own == id) {
                Some(index) => {
                    table_ids.push(0);
                    local.push(index as u32);
                    selected.push(1f32);
                }
                None => {
                    table_ids.push(id);
                    local.push(0);
                    selected.push(0f32);
                }
            }
        }
        let device = ids.device();
        let table_ids = Tensor::from_vec(table_ids, ids.shape(), device)?;
        let base = lookup(&table_ids)?;
        let own = self
            .values
            .index_select(&Tensor::from_vec(local, flat.len(), device)?, 0)?
            .reshape(base.shape())?
            .to_dtype(base.dtype())?;
        let mut shape = ids.dims().to_vec();
        shape.push(1);
        let selected = Tensor::from_vec(selected, shape, device)?.to_dtype(base.dtype())?;
        let kept = base.broadcast_mul(&(1.0 - &selected)?)?;
        kept + own.broadcast_mul(&selected)?
    }

    /// Logits `[…, vocab]` from hidden states `x: […, hidden]` and the frozen head's
    /// logits `[…, table_rows]`: this overlay's columns computed from its rows.
    pub fn logits(&self, x: &Tensor, table_logits: Tensor) -> Result<Tensor> {
        let own = x
            .broadcast_matmul(&self.values.to_dtype(x.dtype())?.t()?)?
            .to_dtype(table_logits.dtype())?;
        if self.appended {
            return Tensor::cat(&[&table_logits, &own], D::Minus1);
        }
        let table_logits = match self.vocab > self.table_rows {
            true => table_logits.pad_with_zeros(D::Minus1, 0, self.vocab - self.table_rows)?,
            false => table_logits,
        };
        let device = x.device();
        let mut keep = vec![1f32; self.vocab];
        let mut scatter = vec![0f32; self.ids.len() * self.vocab];
        for (index, &id) in self.ids.iter().enumerate() {
            keep[id as usize] = 0.0;
            scatter[index * self.vocab + id as usize] = 1.0;
        }
        let dtype = table_logits.dtype();
        let keep = Tensor::from_vec(keep, self.vocab, device)?.to_dtype(dtype)?;
        let scatter =
            Tensor::from_vec(scatter, (self.ids.len(), self.vocab), device)?.to_dtype(dtype)?;
        table_logits.broadcast_mul(&keep)? + own.broadcast_matmul(&scatter)?
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn table() -> Tensor {
        Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap()
    }

    #[test]
    fn grown_tables_start_new_rows_at_the_mean() {
        let grown = grown_rows(&table(), 5, &[2, 4]).unwrap();
        assert_eq!(
            grown.to_vec2::<f32>().unwrap(),
            vec![
                vec![1., 2.],
                vec![3., 4.],
                vec![3., 4.],
                vec![3., 4.],
                vec![3., 4.]
            ]
        );
    }

    /// The overlay computes what the grown table with the rows replaced computes, for
    /// ids past the table's end (appended) and inside it (scattered), and its gradient
    /// reaches only its rows.
    #[test]
    fn overlay_equals_the_replaced_table() {
        let device = Device::Cpu;
        for ids in [vec![3u32, 4], vec![1u32, 3], vec![2u32]] {
            let values = Var::from_tensor(
                &Tensor::new(&[[7f32, -1.], [0.5, 2.]], &device)
                    .unwrap()
                    .narrow(0, 0, ids.len())
                    .unwrap(),
            )
            .unwrap();
            let rows = TokenRows::new(ids.clone(), values.as_tensor().clone(), 3).unwrap();
            let vocab = rows.vocab();
            let full = replace_rows(
                &grown_rows(&table(), vocab, &[]).unwrap(),
                &ids,
                values.as_tensor(),
            )
            .unwrap();
            let last = vocab as u32 - 1;
            let tokens = Tensor::new(&[[0u32, last, 2], [1, 1, 0]], &device).unwrap();
            let table = table();
            let embedded = rows
                .embed(&tokens, |ids| {
                    candle_nn::Embedding::new(table.clone(), 2).forward(ids)
                })
                .unwrap();
            let expected = candle_nn::Embedding::new(full.clone(), 2)
                .forward(&tokens)
                .unwrap();
            assert_eq!(
                embedded.to_vec3::<f32>().unwrap(),
                expected.to_vec3::<f32>().unwrap(),
                "{ids:?}"
            );
            let logits = rows
                .logits(
                    &embedded,
                    embedded.broadcast_matmul(&table.t().unwrap()).unwrap(),
                )
                .unwrap();
            let expected = expected.broadcast_matmul(&full.t().unwrap()).unwrap();
            assert_eq!(
                logits.to_vec3::<f32>().unwrap(),
                expected.to_vec3::<f32>().unwrap(),
                "{ids:?}"
            );
            let grads = logits.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(values.as_tensor()).is_some(), "{ids:?}");
        }
    }

    use candle_core::Module;

    #[test]
    fn rows_past_the_table_must_all_be_held() {
        let values = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        let error = TokenRows::new(vec![4], values, 3).unwrap_err();
        assert!(error.to_string().contains("no row for id 3"), "{error}");
    }
}
