//! Weights in Hugging Face safetensors files: reading one file or a sharded set (f32, bf16, f16,
//! all computed in f32), the builder that creates every parameter of a model either from a file or
//! from a seeded random init, and writing a model back under its HF tensor names.
//!
//! Each parameter is created in exactly one place ([`Builder`]) with the HF names it comes from; the
//! builder records them ([`ParamSpec`]), so saving needs no second list of names.

use crate::error::{ModelError, Result, io_err};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use safetensors::Dtype;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// How a frozen model's weight matrices are kept in memory (the stages' `dtype` key): the
/// embeddings, the attention and MLP projections and the LM head of a model that is not
/// trained (a KL reference, a reward model that scores, a LoRA base). Norms, biases, scalar
/// heads and every trained weight stay f32 (trained weights keep f32 master copies).
///
/// A weight kept in bf16 is widened to f32 exactly for each product that reads it (or packed
/// once for a generation, [`crate::PackedWeights`]): the numbers are those of an f32 model whose
/// weights have the bf16 values, which is what a bf16 file holds. Half the memory.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// The file's: bf16 when every weight file of the model is bf16, f32 otherwise.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl WeightDtype {
    /// Whether a frozen model read from files of `file_dtypes` (as [`SafetensorsFiles::dtypes`]
    /// gives them; empty for a model not read from files) keeps its matrices in bf16.
    pub fn keeps_bf16(self, file_dtypes: &[String]) -> bool {
        match self {
            WeightDtype::Auto => !file_dtypes.is_empty() && file_dtypes.iter().all(|d| d == "BF16"),
            WeightDtype::F32 => false,
            WeightDtype::Bf16 => true,
        }
    }
}

/// How a weight matrix is stored in the HF file, relative to burn's `[in, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `nn.Linear`: `[out, in]`; transposed on load and on save.
    OutIn,
    /// GPT-2 `Conv1D`: already `[in, out]`.
    InOut,
    /// Vectors and embedding tables: stored as they are.
    Same,
}

/// One model parameter and the HF tensors it is made of. A fused parameter (q|k|v, gate|up) lists
/// several tensors, concatenated along the output dimension in the given order.
#[derive(Clone, Debug)]
pub(crate) struct ParamSpec {
    pub id: ParamId,
    /// (HF tensor name, width along the output dimension).
    pub parts: Vec<(String, usize)>,
    pub layout: Layout,
}

/// The tensors of a checkpoint: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub struct SafetensorsFiles {
    files: Vec<PathBuf>,
    /// tensor name → (index into `files`, shape from the header).
    index: HashMap<String, (usize, Vec<usize>)>,
    /// tensor name → (dtype, where its bytes are in its file: [start, end)).
    data: HashMap<String, (String, [u64; 2])>,
}

/// The largest safetensors header accepted (the `safetensors` crate's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What a safetensors file's header declares.
struct Header {
    /// (name, shape) of each tensor.
    tensors: Vec<(String, Vec<usize>)>,
    /// Each tensor's dtype (as the header spells it) and data offsets, relative to `data_start`.
    entries: Vec<(String, String, [u64; 2])>,
    /// Where the tensor data starts in the file (after the length and the header).
    data_start: u64,
    /// Bytes of tensor data after the header.
    data_len: u64,
}

/// Reads the header of the safetensors file `path` alone (no tensor data).
fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(format!("{size} bytes: too short for a safetensors header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > size - 8 {
        return Err(bad(format!(
            "the header claims {n} bytes in a file of {size}; the file is truncated or not safetensors"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
    let mut tensors = Vec::with_capacity(header.len());
    let mut entries = Vec::with_capacity(header.len());
    // The end of the tensor data the header declares: a file cut short (a copy or a write that
    // did not finish) is named as truncated here, before anything is read.
    let mut data_end = 0u64;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        if let Some(end) = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
        {
            data_end = data_end.max(end);
        }
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape in the header")))?;
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .to_string();
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| match o.as_slice() {
                [a, b] => Some([a.as_u64()?, b.as_u64()?]),
                _ => None,
            })
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has no valid data_offsets in the header"
                ))
            })?;
        entries.push((name.clone(), dtype, offsets));
        tensors.push((name, shape));
    }
    let data = size - 8 - n;
    if data_end > data {
        return Err(bad(format!(
            "the file is truncated: its header declares {data_end} bytes of tensor data but {data} follow it"
        )));
    }
    Ok(Header {
        tensors,
        entries,
        data_start: 8 + n,
        data_len: data,
    })
}

/// Bytes per element of a safetensors dtype, as the format names them; None for an unknown one.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// The checks `SafeTensors::deserialize` makes of a header, from the header alone: every dtype
/// known, each tensor's bytes its shape's, the tensors' data back to back from offset 0 and
/// ending where the file does.
fn validate(path: &Path, header: &Header) -> Result<()> {
    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(header.entries.len());
    for ((name, dtype, [start, end]), (_, shape)) in header.entries.iter().zip(&header.tensors) {
        let size = dtype_bytes(dtype)
            .ok_or_else(|| bad(format!("tensor `{name}` has an unknown dtype `{dtype}`")))?;
        let n = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(size));
        if end < start || n != Some(end - start) {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] do not hold its shape {shape:?} of {dtype}"
            )));
        }
        spans.push((*start, *end, name));
    }
    spans.sort_unstable();
    let mut at = 0u64;
    for (start, end, name) in spans {
        if start != at {
            return Err(bad(format!(
                "tensor `{name}` starts at byte {start} of the data, where {at} was expected (tensors overlap or leave a gap)"
            )));
        }
        at = end;
    }
    if at != header.data_len {
        return Err(bad(format!(
            "the header's tensors hold {at} bytes but {} follow the header",
            header.data_len
        )));
    }
    Ok(())
}

/// Bytes of memory available to this process: `MemAvailable` of /proc/meminfo (Linux); None
/// elsewhere, or when it cannot be read.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// The (name, shape) of every tensor of the model folder `dir`, from the safetensors headers
/// alone (no tensor data is read).
pub fn tensor_shapes(dir: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = Vec::new();
    for path in shard_paths(dir)? {
        out.extend(read_header(&path)?.tensors);
    }
    Ok(out)
}

/// The (name, shape) of every tensor of the one safetensors file `path`, from its header.
pub fn file_tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(read_header(path)?.tensors)
}

/// The safetensors files of the model folder `dir`: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names (plain file names inside `dir`).
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    let shard_names: Vec<String> = if single.exists() {
        vec!["model.safetensors".into()]
    } else if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: index_path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::ConfigKey {
                path: index_path.clone(),
                key: "weight_map".into(),
                msg: "is missing or not an object".into(),
            })?;
        let mut set = BTreeSet::new();
        for (tensor, value) in map {
            let file = value.as_str().filter(|f| {
                !f.is_empty() && Path::new(f).file_name() == Some(std::ffi::OsStr::new(f))
            });
            let Some(file) = file else {
                return Err(ModelError::ConfigKey {
                    path: index_path.clone(),
                    key: format!("weight_map.{tensor}"),
                    msg: format!(
                        "= {value}: expected the name of a safetensors file in the model folder"
                    ),
                });
            };
            set.insert(file.to_string());
        }
        if set.is_empty() {
            return Err(ModelError::ConfigKey {
                path: index_path.clone(),
                key: "weight_map".into(),
                msg: "names no tensor; write the index that belongs to the shards".into(),
            });
        }
        set.into_iter().collect()
    } else {
        return Err(ModelError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors nor model.safetensors.index.json in the model folder",
            ),
        });
    };
    Ok(shard_names.iter().map(|n| dir.join(n)).collect())
}

impl SafetensorsFiles {
    /// Opens the weights of the model folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_paths(dir, shard_paths(dir)?)
    }

    /// Opens one safetensors file (an adapter's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_paths(path, vec![path.to_path_buf()])
    }

    /// The names of all tensors in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Opens `paths`, the weights of `dir` (named in errors): their headers, validated; the
    /// tensors are read one at a time when asked for ([`Self::read`]), so loading holds one
    /// tensor's bytes at a time besides the model, not the files.
    fn open_paths(dir: &Path, paths: Vec<PathBuf>) -> Result<Self> {
        // The headers first: what the files declare decides whether they fit in memory, before
        // any tensor data is read.
        let (mut index, mut data) = (HashMap::new(), HashMap::new());
        let (mut values, mut largest) = (0u64, 0u64);
        for (i, path) in paths.iter().enumerate() {
            let header = read_header(path)?;
            validate(path, &header)?;
            for ((name, shape), (_, dtype, [start, end])) in
                header.tensors.into_iter().zip(header.entries)
            {
                let n = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
                values = values.saturating_add(n);
                largest = largest.max(end - start);
                let at = [header.data_start + start, header.data_start + end];
                data.insert(name.clone(), (dtype, at));
                index.insert(name, (i, shape));
            }
        }
        // The parameters in f32, and the largest tensor's bytes while it is converted.
        let need = values.saturating_mul(4).saturating_add(largest);
        if let Some(available) = available_memory()
            && need > available
        {
            return Err(ModelError::Invalid(format!(
                "{}: loading this model needs {need} bytes ({:.1} GB: {} for its {values} parameters in f32 and {largest} to read its largest tensor) but there are {available} bytes available (MemAvailable in /proc/meminfo); free memory, or use a smaller model or a machine with more memory",
                dir.display(),
                need as f64 / 1e9,
                values.saturating_mul(4),
            )));
        }
        Ok(Self {
            files: paths,
            index,
            data,
        })
    }

    /// Layers whose weights the files hold: one more than the highest N of a tensor named
    /// `….layers.N.…` (Llama family) or `….h.N.…` (GPT-2); 0 when there are none.
    pub fn layers(&self) -> usize {
        self.index
            .keys()
            .filter_map(|name| {
                let parts: Vec<&str> = name.split('.').collect();
                parts
                    .windows(2)
                    .find(|w| w[0] == "layers" || w[0] == "h")
                    .and_then(|w| w[1].parse::<usize>().ok())
            })
            .max()
            .map_or(0, |l| l + 1)
    }

    /// The weights' files in messages about them as a whole: the path of `model.safetensors`, or
    /// "the N shards of model.safetensors.index.json".
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [p] => p.display().to_string(),
            files => format!("the {} shards of model.safetensors.index.json", files.len()),
        }
    }

    /// Checks that tensor `name` is in the files with shape `expected` (from the header: nothing
    /// is read or allocated).
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let Some((i, shape)) = self.index.get(name) else {
            return Err(ModelError::MissingTensor {
                path: self.files.first().cloned().unwrap_or_default(),
                name: name.to_string(),
            });
        };
        if shape != expected {
            return Err(ModelError::TensorShape {
                path: self.files[*i].clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
        Ok(())
    }

    /// The path used in messages about tensor `name` (its shard, or the first file).
    pub fn path_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).map_or(0, |e| e.0);
        &self.files[i]
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Dtypes found in the files, e.g. `["BF16"]`.
    pub fn dtypes(&self) -> Vec<String> {
        let set: BTreeSet<String> = self.data.values().map(|(d, _)| d.clone()).collect();
        set.into_iter().collect()
    }

    /// Reads tensor `name`, checks its shape, and converts it to f32.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        use std::io::{Read, Seek, SeekFrom};
        self.check_shape(name, expected)?;
        let path = &self.files[self.index[name].0];
        let (dtype, [start, end]) = &self.data[name];
        let bytes = {
            let mut f = std::fs::File::open(path).map_err(io_err(path))?;
            f.seek(SeekFrom::Start(*start)).map_err(io_err(path))?;
            let mut b = vec![0u8; (end - start) as usize];
            f.read_exact(&mut b).map_err(io_err(path))?;
            b
        };
        let data = bytes.as_slice();
        let (out, non_finite) = match dtype.as_str() {
            "F32" => to_f32::<4>(data, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            "BF16" => to_f32::<2>(data, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            "F16" => to_f32::<2>(data, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            other => {
                return Err(ModelError::TensorDtype {
                    path: path.clone(),
                    name: name.to_string(),
                    dtype: other.to_string(),
                });
            }
        };
        // A NaN or infinity in the weights would only show later as a run of NaN losses (or
        // garbage samples); it is named here, with its tensor and file.
        if let Some((index, value, count)) = non_finite {
            return Err(ModelError::NonFinite {
                path: path.clone(),
                name: name.to_string(),
                value,
                index,
                count,
            });
        }
        Ok(out)
    }
}

/// Converts little-endian values of `N` bytes each to f32 in one pass that also finds the
/// non-finite ones: (values, (index of the first, its value, how many) when there are any).
fn to_f32<const N: usize>(
    data: &[u8],
    convert: impl Fn(&[u8]) -> f32,
) -> (Vec<f32>, Option<(usize, f32, usize)>) {
    let mut out = Vec::with_capacity(data.len() / N);
    let mut count = 0usize;
    for c in data.chunks_exact(N) {
        let x = convert(c);
        count += usize::from(!x.is_finite());
        out.push(x);
    }
    let first = (count > 0)
        .then(|| out.iter().position(|x| !x.is_finite()))
        .flatten()
        .map(|i| (i, out[i], count));
    (out, first)
}

/// Where new parameters come from.
pub(crate) enum Source<'a> {
    /// Normal(0, std) weights from a seeded generator; biases zero, norm weights one.
    Random(Box<StdRng>),
    File(&'a SafetensorsFiles),
}

/// Creates parameters on a device and records their HF names.
pub(crate) struct Builder<'a> {
    pub source: Source<'a>,
    pub device: Device,
    pub specs: Vec<ParamSpec>,
}

impl<'a> Builder<'a> {
    pub fn random(seed: u64, device: &Device) -> Self {
        Self {
            source: Source::Random(Box::new(StdRng::seed_from_u64(seed))),
            device: device.clone(),
            specs: Vec::new(),
        }
    }

    pub fn from_files(files: &'a SafetensorsFiles, device: &Device) -> Self {
        Self {
            source: Source::File(files),
            device: device.clone(),
            specs: Vec::new(),
        }
    }

    fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
        // Box-Muller: deterministic across platforms for a given seed.
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = std::f64::consts::TAU * u2;
            out.push((r * t.cos()) as f32);
            out.push((r * t.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    /// A `[rows, cols]` matrix in burn layout from the parts' HF tensors (or random).
    fn matrix(
        &mut self,
        parts: &[(String, usize)],
        d_in: usize,
        layout: Layout,
        std: f64,
    ) -> Result<Tensor<2>> {
        let d_out: usize = parts.iter().map(|p| p.1).sum();
        let data = match &mut self.source {
            Source::Random(rng) => Self::normal(rng, d_in * d_out, std),
            Source::File(files) => {
                // Every part checked against the header before the matrix is allocated, so a
                // config.json that disagrees with the weights allocates nothing of its sizes.
                for (name, w) in parts {
                    match layout {
                        Layout::OutIn => files.check_shape(name, &[*w, d_in])?,
                        Layout::InOut | Layout::Same => files.check_shape(name, &[d_in, *w])?,
                    }
                }
                let mut full = vec![0f32; d_in * d_out];
                let mut col0 = 0;
                for (name, w) in parts {
                    let w = *w;
                    match layout {
                        Layout::OutIn => {
                            let part = files.read(name, &[w, d_in])?;
                            for o in 0..w {
                                for i in 0..d_in {
                                    full[i * d_out + col0 + o] = part[o * d_in + i];
                                }
                            }
                        }
                        Layout::InOut | Layout::Same => {
                            let part = files.read(name, &[d_in, w])?;
                            for i in 0..d_in {
                                full[i * d_out + col0..i * d_out + col0 + w]
                                    .copy_from_slice(&part[i * w..(i + 1) * w]);
                            }
                        }
                    }
                    col0 += w;
                }
                full
            }
        };
        Ok(Tensor::from_data(
            TensorData::new(data, [d_in, d_out]),
            &self.device,
        ))
    }

    /// A vector made of the parts' HF tensors (or `fill`).
    fn vector(&mut self, parts: &[(String, usize)], fill: f32) -> Result<Tensor<1>> {
        let n: usize = parts.iter().map(|p| p.1).sum();
        let data = match &self.source {
            Source::Random(_) => vec![fill; n],
            Source::File(files) => {
                for (name, w) in parts {
                    files.check_shape(name, &[*w])?;
                }
                let mut v = Vec::with_capacity(n);
                for (name, w) in parts {
                    v.extend(files.read(name, &[*w])?);
                }
                v
            }
        };
        Ok(Tensor::from_data(TensorData::new(data, [n]), &self.device))
    }

    fn record<const D: usize>(
        &mut self,
        t: Tensor<D>,
        parts: Vec<(String, usize)>,
        layout: Layout,
    ) -> Param<Tensor<D>> {
        // The id is derived from the HF name, so that it is the same in every process: optimizer
        // state saved with a checkpoint finds its parameters again on resume.
        let mut p = Param::from_tensor(t);
        p.id = ParamId::from(stable_id(&parts[0].0));
        self.specs.push(ParamSpec {
            id: p.id,
            parts,
            layout,
        });
        p
    }

    /// A linear layer whose output is the concatenation of `outputs` (HF prefix, width).
    pub fn linear(
        &mut self,
        outputs: &[(&str, usize)],
        d_in: usize,
        bias: bool,
        layout: Layout,
        std: f64,
    ) -> Result<Linear> {
        let w_parts: Vec<(String, usize)> = outputs
            .iter()
            .map(|(p, w)| (format!("{p}.weight"), *w))
            .collect();
        let weight = self.matrix(&w_parts, d_in, layout, std)?;
        let weight = self.record(weight, w_parts, layout);
        let bias = if bias {
            let b_parts: Vec<(String, usize)> = outputs
                .iter()
                .map(|(p, w)| (format!("{p}.bias"), *w))
                .collect();
            let b = self.vector(&b_parts, 0.0)?;
            Some(self.record(b, b_parts, Layout::Same))
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// An embedding table `[n, d]` stored under `name`.
    pub fn embedding(&mut self, name: &str, n: usize, d: usize, std: f64) -> Result<Embedding> {
        // Stored [n, d] in both layouts; `matrix` with d_in = n reads it unchanged.
        let parts = vec![(name.to_string(), d)];
        let w = self.matrix(&parts, n, Layout::Same, std)?;
        Ok(Embedding {
            weight: self.record(w, parts, Layout::Same),
        })
    }

    /// A norm's weight (ones when new) and optional bias (zeros).
    pub fn norm_params(
        &mut self,
        prefix: &str,
        d: usize,
        bias: bool,
    ) -> Result<(Param<Tensor<1>>, Option<Param<Tensor<1>>>)> {
        let wp = vec![(format!("{prefix}.weight"), d)];
        let w = self.vector(&wp, 1.0)?;
        let w = self.record(w, wp, Layout::Same);
        let b = if bias {
            let bp = vec![(format!("{prefix}.bias"), d)];
            let b = self.vector(&bp, 0.0)?;
            Some(self.record(b, bp, Layout::Same))
        } else {
            None
        };
        Ok((w, b))
    }
}

/// FNV-1a hash of a tensor name: the id of the parameter whose first HF tensor it is, the same
/// in every process (optimizer state saved with a checkpoint is keyed by it).
pub fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Collects the current values of the float parameters `wanted` by id.
struct Collect {
    wanted: std::collections::HashSet<ParamId>,
    values: HashMap<ParamId, TensorData>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.wanted.contains(&param.id) {
            self.values.insert(param.id, param.val().into_data());
        }
    }
}

/// The HF tensors (name, shape, f32 data) of a module built by a [`Builder`] with `specs`.
pub(crate) fn hf_tensors<M: Module>(
    module: &M,
    specs: &[ParamSpec],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut c = Collect {
        wanted: specs.iter().map(|s| s.id).collect(),
        values: HashMap::new(),
    };
    module.visit(&mut c);
    let mut out = Vec::new();
    for spec in specs {
        let Some(data) = c.values.remove(&spec.id) else {
            continue;
        };
        let shape: Vec<usize> = data.shape().to_vec();
        let values = crate::ops::data_f32(data);
        for k in 0..spec.parts.len() {
            out.push(hf_part(spec, k, &shape, &values));
        }
    }
    out
}

/// HF tensor `k` of the parameter `spec` describes, from the parameter's values (burn layout,
/// `shape`): its name, HF shape and values.
pub(crate) fn hf_part(
    spec: &ParamSpec,
    k: usize,
    shape: &[usize],
    values: &[f32],
) -> (String, Vec<usize>, Vec<f32>) {
    let (name, w) = (&spec.parts[k].0, spec.parts[k].1);
    let col0: usize = spec.parts[..k].iter().map(|p| p.1).sum();
    if shape.len() == 1 {
        return (name.clone(), vec![w], values[col0..col0 + w].to_vec());
    }
    let (d_in, d_out) = (shape[0], shape[1]);
    match spec.layout {
        Layout::OutIn => {
            let mut t = vec![0f32; w * d_in];
            for i in 0..d_in {
                for o in 0..w {
                    t[o * d_in + i] = values[i * d_out + col0 + o];
                }
            }
            (name.clone(), vec![w, d_in], t)
        }
        Layout::InOut | Layout::Same => {
            let mut t = Vec::with_capacity(w * d_in);
            for i in 0..d_in {
                t.extend_from_slice(&values[i * d_out + col0..i * d_out + col0 + w]);
            }
            (name.clone(), vec![d_in, w], t)
        }
    }
}

/// One tensor to write whose values are computed when it is written ([`write_lazy`]): as f32,
/// or rounded to bf16 (to nearest, ties to even, as torch rounds) when `bf16`.
pub(crate) struct LazyTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn Fn() -> Vec<f32> + 'a>,
    pub bf16: bool,
}

impl safetensors::View for &LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        if self.bf16 { Dtype::BF16 } else { Dtype::F32 }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let v = (self.values)();
        assert_eq!(
            v.len(),
            self.shape.iter().product::<usize>(),
            "{}: values for its shape",
            self.name
        );
        std::borrow::Cow::Owned(if self.bf16 {
            v.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        } else {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        })
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * if self.bf16 { 2 } else { 4 }
    }
}

/// [`write_safetensors`] of tensors computed one at a time as they are written, so that saving
/// a model holds one tensor's copy at a time, not the whole model's: the same bytes.
pub(crate) fn write_lazy(path: &Path, tensors: &[LazyTensor]) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|t| (t.name.clone(), t));
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: format!("cannot write: {e}"),
    })
}

/// Writes f32 tensors to a safetensors file (with `format = pt` metadata, as transformers expects).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                    .expect("shape matches data length"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: format!("cannot write: {e}"),
    })
}
