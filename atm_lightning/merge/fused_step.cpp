// ATM's merge step as a single function for a packed batch: CPU, float32, inference.
//
// The same merges as the batched step (atm_lightning/merge/step.py) in loops over each image's
// tokens, with the similarity product left to ATen's matmul. Built on first use by atm_lightning/merge/fused.py; see its docstring for why. Also the
// attention of a packed batch, per image and head (packed_attention, at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

// On x86-64 Linux the hot loops are also compiled for AVX2 and picked at load time: wider vectors,
// the same operations in the same order (no FMA contraction), so the same results.
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#define ATM_HOT __attribute__((target_clones("avx2", "default")))
#else
#define ATM_HOT
#endif

namespace {

// Eight running sums, so that the compiler can vectorise the loop without reordering it.
ATM_HOT float dot(const float* a, const float* b, int64_t length) {
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t c = 0;
  for (; c + 8 <= length; c += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[c + k] * b[c + k];
  float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; c < length; ++c) sum += a[c] * b[c];
  return sum;
}

float row_norm(const float* row, int64_t length) { return std::sqrt(dot(row, row, length)); }


// Where one image's keys are: [H, n, d] with rows of d contiguous floats.
struct KeyView {
  const float* data;
  int64_t heads, dim, head_stride, token_stride;
};

// Head-averaged softmax attention of the class token (query: H rows of d floats, head_stride
// apart) to one image's n keys, with log(size) added to the logits under proportional attention.
std::vector<float> class_attention(const float* query, int64_t query_stride, const KeyView& keys, int64_t n,
                                   const std::vector<float>& size, bool log_size, float scale) {
  const int64_t heads = keys.heads, dim = keys.dim;
  std::vector<float> attention(n, 0.0f), logits(n), scaled(dim), bias(n, 0.0f);
  if (log_size)
    for (int64_t j = 0; j < n; ++j) bias[j] = std::log(size[j]);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < dim; ++c) scaled[c] = query[h * query_stride + c] * scale;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float logit = dot(scaled.data(), keys.data + h * keys.head_stride + j * keys.token_stride, dim);
      logits[j] = log_size ? logit + bias[j] : logit;
      top = std::max(top, logits[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) total += (logits[j] = std::exp(logits[j] - top));
    for (int64_t j = 0; j < n; ++j) attention[j] += logits[j] / total;
  }
  for (int64_t j = 0; j < n; ++j) attention[j] /= static_cast<float>(heads);
  return attention;
}

// Unit-length matching features [len(pos), W] of the tokens at pos: every head's key normalised
// and scaled by 1/sqrt(H) (per_head, W = H d), or the head-averaged key normalised (W = d).
ATM_HOT at::Tensor features(const KeyView& keys, const std::vector<int64_t>& pos, bool per_head) {
  const int64_t heads = keys.heads, dim = keys.dim;
  const int64_t width = per_head ? heads * dim : dim;
  const float* k = keys.data;
  const int64_t kh = keys.head_stride, kn = keys.token_stride;
  const float head_scale = static_cast<float>(std::sqrt(static_cast<double>(heads)));
  at::Tensor out = at::empty({static_cast<int64_t>(pos.size()), width}, at::TensorOptions().dtype(at::kFloat));
  float* base = out.data_ptr<float>();
  for (size_t i = 0; i < pos.size(); ++i) {
    float* row = base + i * width;
    const float* key = k + pos[i] * kn;
    if (per_head) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* head = key + h * kh;
        const float denom = std::max(row_norm(head, dim), 1e-12f) * head_scale;
        for (int64_t c = 0; c < dim; ++c) row[h * dim + c] = head[c] / denom;
      }
    } else {
      for (int64_t c = 0; c < dim; ++c) row[c] = key[c];
      for (int64_t h = 1; h < heads; ++h)
        for (int64_t c = 0; c < dim; ++c) row[c] += key[h * kh + c];
      for (int64_t c = 0; c < dim; ++c) row[c] /= static_cast<float>(heads);
      const float denom = std::max(row_norm(row, dim), 1e-12f);
      for (int64_t c = 0; c < dim; ++c) row[c] /= denom;
    }
  }
  return out;
}

// The policy's settings for one block, the same for every image.
struct StepOptions {
  int64_t num_protected;
  bool per_head, size_split, size_weighted, keep_norm;
  float attention_power, theta;
};

// One image's step: its n tokens (rows of C floats), sizes (all 1 before the first merge), keys
// and the class token's attention (empty unless attention_power > 0). When anything merges,
// tokens/sizes hold the output in order [protected, unmerged sources, destinations].
struct ImageStep {
  bool merged = false;
  std::vector<float> tokens, sizes;
};

ATM_HOT ImageStep merge_image(const float* xp, int64_t n, int64_t channels, const std::vector<float>& size, const KeyView& keys,
                      const std::vector<float>& attention, const StepOptions& options) {
  ImageStep result;
  const int64_t num_protected = options.num_protected;
  const bool attend = !attention.empty();
  // The split: sources at even positions past the protected tokens, destinations at odd ones,
  // or (size_split) the smaller half by size as sources, ties in position order.
  std::vector<int64_t> a_pos, b_pos;
  if (options.size_split) {
    std::vector<int64_t> order(std::max<int64_t>(n - num_protected, 0));
    std::iota(order.begin(), order.end(), num_protected);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return size[i] < size[j]; });
    const size_t num_sources = (order.size() + 1) / 2;
    a_pos.assign(order.begin(), order.begin() + num_sources);
    b_pos.assign(order.begin() + num_sources, order.end());
  } else {
    for (int64_t j = num_protected; j < n; ++j) (j % 2 == 0 ? a_pos : b_pos).push_back(j);
  }
  const int64_t num_a = a_pos.size(), num_b = b_pos.size();
  if (num_a == 0 || num_b == 0) return result;

  // Effective similarity 1 - (1 - cos) * weight of every pair; each source's best destination
  // (the first on ties) merges if it is strictly above the threshold.
  at::Tensor scores = at::mm(features(keys, a_pos, options.per_head), features(keys, b_pos, options.per_head).t());
  float* cos = scores.data_ptr<float>();
  const float tokens = static_cast<float>(num_a + num_b);  // attention * tokens: 1 for an average token
  std::vector<float> b_size(num_b), b_attention(num_b, 0.0f), weight(num_b, 1.0f);
  for (int64_t j = 0; j < num_b; ++j) {
    b_size[j] = size[b_pos[j]];
    if (attend) b_attention[j] = attention[b_pos[j]] * tokens;
  }
  const float power = options.attention_power;
  const bool size_weighted = options.size_weighted;
  std::vector<float> total(num_b), share(num_b);
  std::vector<int64_t> src, dst;  // merged pairs, in source slot order
  for (int64_t i = 0; i < num_a; ++i) {
    const int64_t a = a_pos[i];
    float* row = cos + i * num_b;
    if (size_weighted || attend) {
      // One simple loop per factor (no branch inside), so that each vectorises.
      const float a_size = size[a], a_attention = attend ? attention[a] * tokens : 0.0f;
      for (int64_t j = 0; j < num_b; ++j) total[j] = std::max(a_size + b_size[j], 1e-12f);
      if (size_weighted)
        for (int64_t j = 0; j < num_b; ++j) weight[j] = ((a_size + a_size) * b_size[j]) / total[j];
      if (attend) {
        for (int64_t j = 0; j < num_b; ++j)
          share[j] = std::max((a_attention * b_size[j] + b_attention[j] * a_size) / total[j], 1e-6f);
        if (power == 0.5f)
          for (int64_t j = 0; j < num_b; ++j) share[j] = std::sqrt(share[j]);
        else
          for (int64_t j = 0; j < num_b; ++j) share[j] = std::pow(share[j], power);
        if (size_weighted)
          for (int64_t j = 0; j < num_b; ++j) weight[j] = weight[j] * share[j];
        else
          std::copy(share.begin(), share.end(), weight.begin());
      }
      for (int64_t j = 0; j < num_b; ++j) row[j] = row[j] - (1.0f - row[j]) * (weight[j] - 1.0f);
    }
    int64_t best = 0;
    for (int64_t j = 1; j < num_b; ++j)
      if (row[j] > row[best]) best = j;
    if (row[best] > options.theta) {
      src.push_back(a);
      dst.push_back(b_pos[best]);
    }
  }
  if (src.empty()) return result;

  // Destinations become the size-weighted mean of their parts, sources added in slot order;
  // with keep_norm, at the parts' size-weighted mean length.
  const bool keep_norm = options.keep_norm;
  std::vector<float> new_size(size), sum, length;
  std::vector<int64_t> slot(n, -1);  // row in sum/length of each destination that takes in sources
  std::vector<char> merged(n, 0);
  for (size_t p = 0; p < src.size(); ++p) {
    merged[src[p]] = 1;
    if (slot[dst[p]] < 0) {
      slot[dst[p]] = static_cast<int64_t>(sum.size() / channels);
      const float* token = xp + dst[p] * channels;
      for (int64_t c = 0; c < channels; ++c) sum.push_back(token[c] * size[dst[p]]);
      if (keep_norm) length.push_back(row_norm(token, channels) * size[dst[p]]);
    }
  }
  for (size_t p = 0; p < src.size(); ++p) {
    const int64_t s = src[p], d = slot[dst[p]];
    const float* token = xp + s * channels;
    new_size[dst[p]] += size[s];
    for (int64_t c = 0; c < channels; ++c) sum[d * channels + c] += token[c] * size[s];
    if (keep_norm) length[d] += row_norm(token, channels) * size[s];
  }

  std::vector<char> is_source(n, 0);
  for (int64_t a : a_pos) is_source[a] = 1;
  std::vector<int64_t> order(num_protected);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t j = num_protected; j < n; ++j)
    if (is_source[j] && !merged[j]) order.push_back(j);
  for (int64_t j = num_protected; j < n; ++j)
    if (!is_source[j]) order.push_back(j);
  const int64_t out_n = order.size();
  result.merged = true;
  result.tokens.resize(out_n * channels);
  result.sizes.resize(out_n);
  for (int64_t i = 0; i < out_n; ++i) {
    const int64_t j = order[i];
    float* row = result.tokens.data() + i * channels;
    result.sizes[i] = new_size[j];
    if (new_size[j] == size[j]) {
      std::copy_n(xp + j * channels, channels, row);
      continue;
    }
    const float* total = sum.data() + slot[j] * channels;
    for (int64_t c = 0; c < channels; ++c) row[c] = total[c] / new_size[j];
    if (keep_norm) {
      const float factor = length[slot[j]] / new_size[j] / std::max(row_norm(row, channels), 1e-12f);
      for (int64_t c = 0; c < channels; ++c) row[c] = row[c] * factor;
    }
  }
  return result;
}

StepOptions step_options(int64_t num_protected, bool per_head, bool size_split, bool size_weighted,
                         double attention_power, bool keep_norm, double theta) {
  return {num_protected, per_head, size_split, size_weighted, keep_norm, static_cast<float>(attention_power),
          static_cast<float>(theta)};
}

}  // namespace

// The images of a batch in an order that spreads their work evenly over the threads: ATen's
// parallel_for hands each thread one contiguous range, so range p takes images p, p + P, p + 2P,
// ... of P threads instead of one block of neighbours that may all be large.
std::vector<int64_t> interleaved(int64_t count) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  std::vector<int64_t> order;
  order.reserve(count);
  for (int64_t p = 0; p < threads; ++p)
    for (int64_t i = p; i < count; i += threads) order.push_back(i);
  return order;
}

// A batch of images, each merged on its own, in parallel over the images.
// x [T, C]: image i's count[i] tokens one image after the other (packed, or padded without
// padding); keys [B, H, W, d] (rows contiguous, W >= every count); attention [B, W], the class
// token's attention, or query [B, H, 1, d] to compute it from (one is needed when
// attention_power > 0); size [B, W] (None: all ones).
// Returns the images in input order: tokens packed [T', C], sizes [B, W'] (0 past each count)
// and counts [B]; or an empty list when no image merges anything.
std::vector<at::Tensor> merge_batch(const at::Tensor& x, const at::Tensor& count_in, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& attention_in,
                                    const std::optional<at::Tensor>& query_in, double scale, bool prop_attn,
                                    const std::optional<at::Tensor>& size_in, int64_t num_protected, bool per_head,
                                    bool size_split, bool size_weighted, double attention_power, bool keep_norm,
                                    double theta) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be contiguous float32 packed tokens [T, C]");
  TORCH_CHECK(count_in.dim() == 1 && count_in.scalar_type() == at::kLong, "count must be long [B]");
  const at::Tensor count = count_in.contiguous();
  const int64_t batch = count.size(0), channels = x.size(1);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == batch && keys.stride(3) == 1 && keys.scalar_type() == at::kFloat,
              "keys must be float32 [B, H, W, d] with contiguous rows");
  const int64_t width = keys.size(2);
  const int64_t* counts = count.data_ptr<int64_t>();
  std::vector<int64_t> start(batch + 1, 0);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(counts[i] <= width, "an image holds more tokens than the keys' width");
    start[i + 1] = start[i] + counts[i];
  }
  TORCH_CHECK(start[batch] == x.size(0), "x must hold exactly sum(count) rows");
  const float* size_data = nullptr;
  if (size_in.has_value()) {
    TORCH_CHECK(size_in->dim() == 2 && size_in->size(0) == batch && size_in->is_contiguous() &&
                    size_in->scalar_type() == at::kFloat,
                "size must be contiguous float32 [B, W]");
    size_data = size_in->data_ptr<float>();
  }
  const int64_t size_width = size_in.has_value() ? size_in->size(1) : 0;
  for (int64_t i = 0; size_data != nullptr && i < batch; ++i)
    TORCH_CHECK(counts[i] <= size_width, "an image holds more tokens than size has columns");
  const float* attention_data = nullptr;
  const float* query_data = nullptr;
  if (attention_power != 0.0 && attention_in.has_value()) {
    TORCH_CHECK(attention_in->dim() == 2 && attention_in->size(0) == batch && attention_in->is_contiguous() &&
                    attention_in->scalar_type() == at::kFloat,
                "the class token's attention must be contiguous float32 [B, W]");
    attention_data = attention_in->data_ptr<float>();
  } else if (attention_power != 0.0) {
    TORCH_CHECK(query_in.has_value() && query_in->dim() == 4 && query_in->size(0) == batch &&
                    query_in->stride(3) == 1 && query_in->scalar_type() == at::kFloat,
                "attention_power > 0 needs the class token's attention [B, W] or its query, float32 [B, H, 1, d]");
    query_data = query_in->data_ptr<float>();
  }
  const int64_t attention_width = attention_data != nullptr ? attention_in->size(1) : 0;
  for (int64_t i = 0; attention_data != nullptr && i < batch; ++i)
    TORCH_CHECK(counts[i] <= attention_width, "an image holds more tokens than attention has columns");
  const StepOptions options =
      step_options(num_protected, per_head, size_split, size_weighted, attention_power, keep_norm, theta);
  const float* xp = x.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  std::vector<ImageStep> steps(batch);
  const std::vector<int64_t> order = interleaved(batch);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = order[t], n = counts[i];
      std::vector<float> size(n, 1.0f), attention;
      if (size_data != nullptr) std::copy_n(size_data + i * size_width, n, size.begin());
      const KeyView key_view{kp + i * keys.stride(0), keys.size(1), keys.size(3), keys.stride(1), keys.stride(2)};
      if (attention_data != nullptr) {
        const float* row = attention_data + i * attention_width;
        attention.assign(row, row + n);
      } else if (query_data != nullptr) {
        attention = class_attention(query_data + i * query_in->stride(0), query_in->stride(1), key_view, n, size,
                                    prop_attn && size_data != nullptr, static_cast<float>(scale));
      }
      steps[i] = merge_image(xp + start[i] * channels, n, channels, size, key_view, attention, options);
    }
  });
  if (std::none_of(steps.begin(), steps.end(), [](const ImageStep& s) { return s.merged; })) return {};

  std::vector<int64_t> out_count(batch), first_row(batch, 0);  // packed output row of each image's first token
  int64_t out_width = 0, total = 0;
  for (int64_t i = 0; i < batch; ++i) {
    out_count[i] = steps[i].merged ? static_cast<int64_t>(steps[i].sizes.size()) : counts[i];
    out_width = std::max(out_width, out_count[i]);
    first_row[i] = total;
    total += out_count[i];
  }
  at::Tensor out = at::empty({total, channels}, x.options());
  at::Tensor out_size = at::zeros({batch, out_width}, x.options());
  at::Tensor out_counts = at::empty({batch}, count.options());
  std::copy(out_count.begin(), out_count.end(), out_counts.data_ptr<int64_t>());
  float* op = out.data_ptr<float>();
  float* os = out_size.data_ptr<float>();
  // Copying the tokens out is a large share of the step: in parallel too.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = out_count[i];
      float* tokens = op + first_row[i] * channels;
      float* sizes = os + i * out_width;
      if (steps[i].merged) {
        std::copy(steps[i].tokens.begin(), steps[i].tokens.end(), tokens);
        std::copy(steps[i].sizes.begin(), steps[i].sizes.end(), sizes);
      } else {
        std::copy_n(xp + start[i] * channels, m * channels, tokens);
        if (size_data != nullptr)
          std::copy_n(size_data + i * size_width, m, sizes);
        else
          std::fill_n(sizes, m, 1.0f);
      }
    }
  });
  return {out, out_size, out_counts};
}

// Attention of packed tokens, one (image, head) at a time in parallel: qkv [T, 3*H*d] holds image
// i's count[i] rows one image after the other; bias [B, W] is added to the logits (log(size) for
// proportional attention, 0 without; a packed batch always has one). Returns the mixed values [T, H*d], the keys for
// matching ([B, H, W, d] per head, or [B, 1, W, d] averaged over heads; zero past each count)
// and, with class_attention, the class token's head-averaged attention [B, W] (else empty).
std::vector<at::Tensor> packed_attention(const at::Tensor& qkv, const at::Tensor& count_in,
                                         const at::Tensor& bias, int64_t heads, double scale,
                                         bool per_head_keys, bool class_attention) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat && qkv.size(1) % (3 * heads) == 0,
              "qkv must be contiguous float32 [T, 3*H*d]");
  TORCH_CHECK(count_in.dim() == 1 && count_in.scalar_type() == at::kLong, "count must be long [B]");
  const at::Tensor count = count_in.contiguous();
  const int64_t batch = count.size(0), dim = qkv.size(1) / (3 * heads), channels = heads * dim;
  const int64_t* counts = count.data_ptr<int64_t>();
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == batch && bias.scalar_type() == at::kFloat, "bias must be float32 [B, W]");
  const int64_t width = bias.size(1);
  std::vector<int64_t> start(batch + 1, 0);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(counts[i] <= width, "an image holds more tokens than bias has columns");
    start[i + 1] = start[i] + counts[i];
  }
  TORCH_CHECK(start[batch] == qkv.size(0), "qkv must hold exactly sum(count) rows");
  at::Tensor mixed = at::empty({qkv.size(0), channels}, qkv.options());
  at::Tensor keys = at::zeros({batch, per_head_keys ? heads : 1, width, dim}, qkv.options());
  at::Tensor first_rows = class_attention ? at::zeros({batch, heads, width}, qkv.options()) : at::Tensor();
  const std::vector<int64_t> order = interleaved(batch * heads);
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: the workers need it too
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    const c10::InferenceMode mode(inference);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = order[t] / heads, h = order[t] % heads, n = counts[i];
      if (n == 0) continue;
      const at::Tensor rows = qkv.narrow(0, start[i], n);
      const at::Tensor q = rows.narrow(1, h * dim, dim), k = rows.narrow(1, channels + h * dim, dim),
                       v = rows.narrow(1, 2 * channels + h * dim, dim);
      at::Tensor logits = at::empty({n, n}, qkv.options());
      at::addmm_out(logits, bias.select(0, i).narrow(0, 0, n).unsqueeze(0).expand({n, n}), q, k.t(), 1.0, scale);
      const at::Tensor probs = at::_softmax(logits, 1, false);
      at::Tensor out = mixed.narrow(0, start[i], n).narrow(1, h * dim, dim);
      at::mm_out(out, probs, v);
      if (per_head_keys) keys.select(0, i).select(0, h).narrow(0, 0, n).copy_(k);
      if (class_attention) first_rows.select(0, i).select(0, h).narrow(0, 0, n).copy_(probs.select(0, 0));
    }
  });
  if (!per_head_keys) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      const c10::InferenceMode mode(inference);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = counts[i];
        at::Tensor total = keys.select(0, i).select(0, 0).narrow(0, 0, n);
        const at::Tensor k = qkv.narrow(0, start[i], n).narrow(1, channels, channels);
        for (int64_t h = 0; h < heads; ++h) total.add_(k.narrow(1, h * dim, dim));
        total.div_(static_cast<double>(heads));
      }
    });
  }
  return {mixed, keys, class_attention ? first_rows.mean(1) : at::Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge_batch", &merge_batch, "ATM's merge step for a packed batch, in parallel over its images");
  m.def("packed_attention", &packed_attention, "Attention of packed ragged tokens, per image and head in parallel");
}
