//! A padded batch of token ids with its attention mask, held on the host.

/// `tokens` and `mask` are row-major [batch, seq]; `mask` is true for real tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl TokenBatch {
    /// Pads every row on the left to the longest (as for generation).
    pub fn left_padded(rows: &[Vec<u32>], pad: u32) -> Self {
        Self::padded(rows, pad, true)
    }

    /// Pads every row on the right to the longest (as for training).
    pub fn right_padded(rows: &[Vec<u32>], pad: u32) -> Self {
        Self::padded(rows, pad, false)
    }

    fn padded(rows: &[Vec<u32>], pad: u32, left: bool) -> Self {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            let n = seq - r.len();
            if left {
                tokens.extend(std::iter::repeat_n(pad, n));
                mask.extend(std::iter::repeat_n(false, n));
            }
            tokens.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(true, r.len()));
            if !left {
                tokens.extend(std::iter::repeat_n(pad, n));
                mask.extend(std::iter::repeat_n(false, n));
            }
        }
        Self {
            tokens,
            mask,
            batch: rows.len(),
            seq,
        }
    }

    /// A batch with no padding: every row has `seq` real tokens.
    pub fn dense(tokens: Vec<u32>, batch: usize, seq: usize) -> Self {
        assert_eq!(tokens.len(), batch * seq, "tokens must be batch × seq");
        Self {
            mask: vec![true; tokens.len()],
            tokens,
            batch,
            seq,
        }
    }

    pub fn row(&self, r: usize) -> &[u32] {
        &self.tokens[r * self.seq..(r + 1) * self.seq]
    }

    pub fn row_mask(&self, r: usize) -> &[bool] {
        &self.mask[r * self.seq..(r + 1) * self.seq]
    }

    /// Index of each row's last real token (0 for an all-padding row).
    pub fn last_real_index(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|r| self.row_mask(r).iter().rposition(|&m| m).unwrap_or(0))
            .collect()
    }

    /// Number of real tokens.
    pub fn real_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_and_right_padding_place_pads_and_mask() {
        let rows = vec![vec![5, 6, 7], vec![8]];
        let l = TokenBatch::left_padded(&rows, 0);
        assert_eq!(l.tokens, vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(l.mask, vec![true, true, true, false, false, true]);
        assert_eq!(l.last_real_index(), vec![2, 2]);
        let r = TokenBatch::right_padded(&rows, 0);
        assert_eq!(r.tokens, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(r.last_real_index(), vec![2, 0]);
        assert_eq!(r.real_tokens(), 4);
    }
}
