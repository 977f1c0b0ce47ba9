// pbs2pc's native runner: runs TVM-compiled code without Python (a board needs only this program,
// libtvm_runtime.so and libtvm_ffi.so).
//
//   runner func LIB FUNC in0.npy in1.npy ... -- out0.npy ...
//       Calls the PrimFunc FUNC of LIB on the inputs; the outputs are allocated with the shapes and dtypes
//       of the existing out*.npy files (the caller writes them, filled with a poison value) and written
//       back into them. Used by the kernel tests (pbs2pc.runtime.native.run_function).
//
//   runner generate DIR [--prompt-ids 1,2,3 | --prompt-ids-file F] [--max-new-tokens N] [--eos ID,ID]
//                       [--temperature T --top-k K --top-p P --seed S] [--threads N] [--stats | --bench]
//                       [--dump-logits FILE.npy]
//       Runs the language model of a bundle (written by pbs2pc.runtime.bundle): DIR/model.runner.txt
//       says where the library, the weights and the KV cache layout are. Prefills the prompt, then decodes
//       one token at a time with the KV cache, printing each new token id on its own line as soon as it
//       is chosen; stops after --max-new-tokens, at a token of --eos, or when the context is full. Greedy
//       (argmax, ties to the lowest id) unless --temperature > 0. --stats prints the prompt and decode rates
//       on stderr; --bench does too, after a warm-up sequence; --dump-logits writes the logits every token
//       was chosen from ([new tokens, vocab] float32).
//
//   runner rpc --tracker HOST:PORT --key KEY [--host 0.0.0.0] [--port 9090] [--port-end 9199] [--threads N]
//       A TVM RPC server registered with TVM's RPC tracker, as python -m tvm.exec.rpc_server is: what
//       pbs2pc tune --rpc-tracker times a board's candidates on, here without Python (rpc_server.cc).
//
// The calling convention is the one of pbs2pc.runtime.model.CompiledModel._run: the manifest's inputs
// (int64 input_ids, position_ids, attention_mask), then per layer the key cache [B, KV, D, C] and the value
// cache [B, KV, C, D] (float32, updated in place), then every weight in manifest order; returns the logits.
//
// Exit status: 0 success, 1 runtime failure, 2 bad usage or input.

#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "rpc_server.h"

namespace ffi = tvm::ffi;

namespace {

// ---- errors -------------------------------------------------------------------------------------------

// A mistake in the command line or its files: exit status 2 with one line.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void Fail(const std::string& message) { throw UsageError(message); }

// ---- dtypes -------------------------------------------------------------------------------------------

struct DType {
  std::string name;   // numpy's name: float32, int8, ...
  std::string descr;  // the .npy descr: <f4, |i1, ...
  DLDataType dl;
};

const std::vector<DType>& KnownDTypes() {
  static const std::vector<DType> types = {
      {"float32", "<f4", {kDLFloat, 32, 1}}, {"float16", "<f2", {kDLFloat, 16, 1}},
      {"float64", "<f8", {kDLFloat, 64, 1}}, {"int8", "|i1", {kDLInt, 8, 1}},
      {"uint8", "|u1", {kDLUInt, 8, 1}},     {"int16", "<i2", {kDLInt, 16, 1}},
      {"uint16", "<u2", {kDLUInt, 16, 1}},   {"int32", "<i4", {kDLInt, 32, 1}},
      {"uint32", "<u4", {kDLUInt, 32, 1}},   {"int64", "<i8", {kDLInt, 64, 1}},
      {"uint64", "<u8", {kDLUInt, 64, 1}},   {"bool", "|b1", {kDLBool, 8, 1}},
  };
  return types;
}

const DType& DTypeByName(const std::string& name) {
  for (const DType& t : KnownDTypes())
    if (t.name == name) return t;
  Fail("unsupported dtype " + name);
}

const DType& DTypeByDescr(std::string descr, const std::string& path) {
  if (descr.size() == 3 && descr[0] == '=') descr[0] = '<';  // native order: this program runs little-endian
  if (descr == "<i1" || descr == "<u1") descr[0] = '|';
  for (const DType& t : KnownDTypes())
    if (t.descr == descr) return t;
  Fail(path + ": unsupported .npy dtype '" + descr + "' (little-endian float16/32/64 and (u)int8..64 only)");
}

size_t ElementBytes(const DType& t) { return t.dl.bits / 8; }

// ---- memory -------------------------------------------------------------------------------------------

// Tensors the runner owns: 64-byte aligned, as TVM's kernels assume.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// Tensors over memory someone else keeps alive (the memory-mapped weights): nothing to allocate or free.
struct BorrowedAlloc {
  void* data;
  void AllocData(DLTensor* t) { t->data = data; }
  void FreeData(DLTensor*) {}
};

const DLDevice kCPU{kDLCPU, 0};

ffi::Tensor NewTensor(const std::vector<int64_t>& shape, const DType& dtype) {
  return ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype.dl, kCPU);
}

size_t NumBytes(const ffi::Tensor& t) { return ffi::GetDataSize(*t.GetDLTensorPtr()); }

// ---- .npy files ---------------------------------------------------------------------------------------

struct NpyHeader {
  const DType* dtype;
  std::vector<int64_t> shape;
  size_t data_offset;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The value of 'key' in the header's Python dict literal, e.g. '<f4' or (2, 3) or False.
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) Fail(path + ": the .npy header has no '" + key + "'");
  at = header.find(':', at);
  size_t begin = header.find_first_not_of(' ', at + 1);
  size_t end;
  if (header[begin] == '(') {
    end = header.find(')', begin) + 1;
  } else if (header[begin] == '\'') {
    end = header.find('\'', begin + 1) + 1;
  } else {
    end = header.find_first_of(",}", begin);
  }
  return header.substr(begin, end - begin);
}

NpyHeader ParseNpy(const std::string& bytes, const std::string& path) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) Fail(path + " is not a .npy file");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t length, start;
  if (major == 1) {
    length = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    start = 10;
  } else {
    length = 0;
    for (int i = 3; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(bytes[8 + i]);
    start = 12;
  }
  if (start + length > bytes.size()) Fail(path + ": truncated .npy header");
  std::string header = bytes.substr(start, length);
  NpyHeader out;
  std::string descr = HeaderField(header, "descr", path);
  out.dtype = &DTypeByDescr(descr.substr(1, descr.size() - 2), path);
  if (HeaderField(header, "fortran_order", path) != "False") Fail(path + ": Fortran-order arrays are not supported");
  std::string shape = HeaderField(header, "shape", path);
  for (size_t i = 1; i < shape.size();) {
    size_t j = shape.find_first_of(",)", i);
    std::string item = shape.substr(i, j - i);
    if (item.find_first_not_of(' ') != std::string::npos) out.shape.push_back(std::stoll(item));
    i = j + 1;
  }
  out.data_offset = start + length;
  return out;
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::string bytes = ReadFile(path);
  NpyHeader h = ParseNpy(bytes, path);
  ffi::Tensor t = NewTensor(h.shape, *h.dtype);
  if (bytes.size() - h.data_offset != NumBytes(t)) Fail(path + ": the data size does not match the shape");
  std::memcpy(t.data_ptr(), bytes.data() + h.data_offset, NumBytes(t));
  return t;
}

const DType& DTypeOf(const ffi::Tensor& t) {
  DLDataType d = t.dtype();
  for (const DType& k : KnownDTypes())
    if (k.dl.code == d.code && k.dl.bits == d.bits && k.dl.lanes == d.lanes) return k;
  Fail("a tensor has a dtype this runner cannot write");
}

void WriteNpy(const std::string& path, const void* data, const std::vector<int64_t>& shape, const DType& dtype) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  else if (shape.size() == 1) dims.resize(dims.size() - 1);
  std::string header = "{'descr': '" + dtype.descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";  // numpy aligns the data to 64 bytes
  size_t bytes = ElementBytes(dtype);
  for (int64_t d : shape) bytes *= static_cast<size_t>(d);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write("\x93NUMPY\x01\x00", 8);
  char len[2] = {static_cast<char>(header.size() & 0xff), static_cast<char>(header.size() >> 8)};
  out.write(len, 2);
  out.write(header.data(), header.size());
  out.write(static_cast<const char*>(data), bytes);
  if (!out) Fail("cannot write " + path);
}

// ---- calling compiled functions -----------------------------------------------------------------------

ffi::Any Call(const ffi::Function& f, const std::vector<ffi::Tensor>& args) {
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  f.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  return result;
}

ffi::Function GetFunction(const ffi::Module& mod, const std::string& name, const std::string& where) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name);
  if (!f.has_value()) Fail(where + " has no function '" + name + "'");
  return f.value();
}

// TVM sizes its thread pool from TVM_NUM_THREADS when the first parallel kernel runs.
void SetThreads(int threads) {
  if (threads > 0) setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
}

int RunFunc(const std::vector<std::string>& args) {
  // args: LIB FUNC in... -- out... [--threads N]
  std::vector<std::string> rest(args.begin(), args.end());
  int threads = 0;
  for (size_t i = 0; i + 1 < rest.size(); ++i) {
    if (rest[i] == "--threads") {
      threads = std::stoi(rest[i + 1]);
      rest.erase(rest.begin() + i, rest.begin() + i + 2);
      break;
    }
  }
  auto sep = std::find(rest.begin(), rest.end(), "--");
  if (rest.size() < 2 || sep == rest.end() || sep - rest.begin() < 2)
    Fail("usage: runner func LIB FUNC in0.npy ... -- out0.npy ...");
  SetThreads(threads);
  std::vector<std::string> in_paths(rest.begin() + 2, sep), out_paths(sep + 1, rest.end());
  std::vector<ffi::Tensor> tensors;
  for (const std::string& p : in_paths) tensors.push_back(ReadNpy(p));
  for (const std::string& p : out_paths) tensors.push_back(ReadNpy(p));  // shapes, dtypes and the poison
  ffi::Module mod = ffi::Module::LoadFromFile(rest[0]);
  Call(GetFunction(mod, rest[1], rest[0]), tensors);
  for (size_t i = 0; i < out_paths.size(); ++i) {
    const ffi::Tensor& t = tensors[in_paths.size() + i];
    std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
    WriteNpy(out_paths[i], t.data_ptr(), shape, DTypeOf(t));
  }
  return 0;
}

// ---- the bundle's spec (model.runner.txt) -------------------------------------------------------------

struct Param {
  const DType* dtype;
  size_t offset, nbytes;
  std::vector<int64_t> shape;
  std::string name;
};

struct Spec {
  std::string library, weights;
  std::vector<std::string> inputs, functions, cpu_features;
  int64_t layers = 0, kv_heads = 0, head_dim = 0, capacity_multiple = 64;
  int64_t vocab_size = 0, max_sequence = 0;
  std::vector<Param> params;

  bool Has(const std::string& function) const {
    return std::find(functions.begin(), functions.end(), function) != functions.end();
  }
};

Spec ReadSpec(const std::string& dir) {
  std::string path = dir + "/model.runner.txt";
  std::ifstream in(path);
  if (!in) Fail(path + " is missing; is " + dir + " a bundle written by pbs2pc compile --bundle?");
  Spec spec;
  std::string line;
  std::getline(in, line);
  if (line != "pbs2pc-runner 1") Fail(path + " is not a version 1 runner spec; write the bundle again");
  while (std::getline(in, line)) {
    std::istringstream s(line);
    std::string key;
    s >> key;
    if (key == "library") s >> spec.library;
    else if (key == "weights") s >> spec.weights;
    else if (key == "vocab_size") s >> spec.vocab_size;
    else if (key == "max_sequence") s >> spec.max_sequence;
    else if (key == "kv_cache") s >> spec.layers >> spec.kv_heads >> spec.head_dim >> spec.capacity_multiple;
    else if (key == "inputs" || key == "functions" || key == "cpu_features") {
      std::vector<std::string>& into =
          key == "inputs" ? spec.inputs : key == "functions" ? spec.functions : spec.cpu_features;
      for (std::string word; s >> word;) into.push_back(word);
    } else if (key == "param") {
      // param DTYPE OFFSET NBYTES NDIM D0 D1 ... NAME
      Param p;
      std::string dtype;
      size_t ndim;
      s >> dtype >> p.offset >> p.nbytes >> ndim;
      p.dtype = &DTypeByName(dtype);
      p.shape.resize(ndim);
      for (int64_t& d : p.shape) s >> d;
      std::getline(s >> std::ws, p.name);
      if (!s && !s.eof()) Fail(path + ": bad line: " + line);
      spec.params.push_back(p);
    }
  }
  if (spec.library.empty() || spec.weights.empty() || spec.layers <= 0 || spec.vocab_size <= 0)
    Fail(path + " is incomplete (library, weights, kv_cache, vocab_size); write the bundle again");
  return spec;
}

// The CPU features the library's code executes, checked before any kernel runs: a clear error, not SIGILL.
void CheckCpu(const Spec& spec) {
#if defined(__aarch64__) && defined(__linux__)
  // From the kernel's auxiliary vector (the names /proc/cpuinfo prints; qemu-user fills it in too).
  const std::map<std::string, unsigned long> hwcap = {
      {"asimd", 1ul << 1}, {"fphp", 1ul << 9}, {"asimdhp", 1ul << 10}, {"asimddp", 1ul << 20}, {"sve", 1ul << 22}};
  unsigned long have = getauxval(AT_HWCAP);
  std::string missing;
  for (const std::string& f : spec.cpu_features) {
    auto it = hwcap.find(f);
    if (it != hwcap.end() && !(have & it->second)) missing += (missing.empty() ? "" : ", ") + f;
  }
  if (!missing.empty())
    Fail("this CPU lacks " + missing + ", which the model's code needs; compile the model for a target "
         "this board supports (pbs2pc compile --target arm is the most portable)");
#else
  (void)spec;
#endif
}

// ---- generation ---------------------------------------------------------------------------------------

struct Options {
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 32;
  std::vector<int64_t> eos;
  double temperature = 0.0, top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  int threads = 0;
  bool bench = false, stats = false;
  std::string dump_logits;
};

std::vector<int64_t> ParseIds(const std::string& text, const std::string& what) {
  std::vector<int64_t> ids;
  std::string item;
  for (char c : text + ",") {
    if (c == ',' || c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      if (!item.empty()) {
        char* end = nullptr;
        ids.push_back(std::strtoll(item.c_str(), &end, 10));
        if (*end != '\0') Fail(what + ": '" + item + "' is not a token id");
        item.clear();
      }
    } else {
      item += c;
    }
  }
  return ids;
}

class Model {
 public:
  Model(const std::string& dir, const Spec& spec) : spec_(spec), vm_(LoadVM(dir + "/" + spec.library)) {
    GetFunction(vm_, "vm_initialization", spec.library)(static_cast<int>(kDLCPU), 0, 2);  // 2: pooled allocator
    MapWeights(dir + "/" + spec.weights);
  }
  ~Model() {
    if (mapped_ != nullptr) munmap(mapped_, mapped_size_);
  }

  // Starts a sequence with room for `capacity` tokens; the logits after its last token.
  const float* Prefill(const std::vector<int64_t>& prompt, int64_t capacity) {
    int64_t c = (std::max<int64_t>(capacity, 1) + spec_.capacity_multiple - 1) / spec_.capacity_multiple *
                spec_.capacity_multiple;
    caches_.clear();
    const DType& f32 = DTypeByName("float32");
    for (int64_t i = 0; i < spec_.layers; ++i) {
      caches_.push_back(NewTensor({1, spec_.kv_heads, spec_.head_dim, c}, f32));
      caches_.push_back(NewTensor({1, spec_.kv_heads, c, spec_.head_dim}, f32));
    }
    for (ffi::Tensor& t : caches_) std::memset(t.data_ptr(), 0, NumBytes(t));
    capacity_ = c;
    length_ = 0;
    return Run(prompt, spec_.Has("prefill") ? "prefill" : "main");
  }

  // Appends one token; the logits after it.
  const float* Step(int64_t token) { return Run({token}, spec_.Has("decode") ? "decode" : "main"); }

  int64_t length() const { return length_; }

 private:
  static ffi::Module LoadVM(const std::string& path) {
    ffi::Module lib = ffi::Module::LoadFromFile(path);
    return GetFunction(lib, "vm_load_executable", path)().cast<ffi::Module>();
  }

  void MapWeights(const std::string& path) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) Fail("cannot open " + path);
    struct stat st;
    fstat(fd, &st);
    mapped_size_ = static_cast<size_t>(st.st_size);
    size_t need = 0;
    for (const Param& p : spec_.params) need = std::max(need, p.offset + p.nbytes);
    if (mapped_size_ < need) {
      close(fd);
      Fail(path + " is truncated; copy the bundle again");
    }
    if (mapped_size_ > 0) {
      mapped_ = mmap(nullptr, mapped_size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (mapped_ == MAP_FAILED) {
        mapped_ = nullptr;
        close(fd);
        Fail("cannot memory-map " + path);
      }
    }
    close(fd);
    for (const Param& p : spec_.params) {
      char* data = static_cast<char*>(mapped_) + p.offset;
      weights_.push_back(ffi::Tensor::FromNDAlloc(BorrowedAlloc{data}, ffi::ShapeView(p.shape.data(), p.shape.size()),
                                                  p.dtype->dl, kCPU));
    }
  }

  const float* Run(const std::vector<int64_t>& ids, const std::string& function) {
    int64_t n = static_cast<int64_t>(ids.size()), total = length_ + n;
    if (total > capacity_) Fail("the KV cache is full");
    const DType& i64 = DTypeByName("int64");
    std::map<std::string, ffi::Tensor> feeds;
    feeds.emplace("input_ids", NewTensor({1, n}, i64));
    feeds.emplace("position_ids", NewTensor({1, n}, i64));
    feeds.emplace("attention_mask", NewTensor({1, total}, i64));
    auto* in = static_cast<int64_t*>(feeds.at("input_ids").data_ptr());
    auto* pos = static_cast<int64_t*>(feeds.at("position_ids").data_ptr());
    auto* mask = static_cast<int64_t*>(feeds.at("attention_mask").data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      in[i] = ids[i];
      pos[i] = length_ + i;
    }
    for (int64_t i = 0; i < total; ++i) mask[i] = 1;
    std::vector<ffi::Tensor> args;
    for (const std::string& name : spec_.inputs) {
      auto it = feeds.find(name);
      if (it == feeds.end()) Fail("the model takes an input '" + name + "' this runner cannot make");
      args.push_back(it->second);
    }
    args.insert(args.end(), caches_.begin(), caches_.end());
    args.insert(args.end(), weights_.begin(), weights_.end());
    ffi::Any out = Call(GetFunction(vm_, function, spec_.library), args);
    if (auto tuple = out.try_cast<ffi::Array<ffi::Any>>()) out = (*tuple)[0];
    ffi::Tensor logits = out.cast<ffi::Tensor>();
    logits_ = logits;  // kept alive until the next call
    DLDataType d = logits.dtype();
    if (d.code != kDLFloat || d.bits != 32) Fail("the model's logits are not float32");
    if (logits.numel() < spec_.vocab_size) Fail("the model returned fewer logits than its vocabulary");
    length_ = total;
    // The last position's row: [1, S, V] from main, [1, 1, V] from prefill and decode.
    return static_cast<const float*>(logits.data_ptr()) + (logits.numel() - spec_.vocab_size);
  }

  const Spec& spec_;
  ffi::Module vm_;
  void* mapped_ = nullptr;
  size_t mapped_size_ = 0;
  std::vector<ffi::Tensor> weights_, caches_;
  ffi::Optional<ffi::Tensor> logits_;
  int64_t capacity_ = 0, length_ = 0;
};

// Picks the next token: greedy (argmax, the lowest id on ties, as torch and numpy), or temperature, top-k,
// top-p sampling in the order Hugging Face and llama.cpp use. (Sampled ids do not repeat the Python
// runtime's for the same seed: the generators differ.)
class Sampler {
 public:
  explicit Sampler(const Options& o) : o_(o), rng_(o.seed) {}

  int64_t operator()(const float* logits, int64_t vocab) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    if (o_.temperature <= 0) return best;
    std::vector<int64_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
    if (o_.top_k > 0 && o_.top_k < vocab) order.resize(o_.top_k);
    std::vector<double> probs(order.size());
    double top = logits[order[0]] / o_.temperature, sum = 0;
    for (size_t i = 0; i < order.size(); ++i) {
      probs[i] = std::exp(logits[order[i]] / o_.temperature - top);
      sum += probs[i];
    }
    size_t keep = order.size();
    if (o_.top_p < 1) {
      double mass = 0;
      for (keep = 0; keep < order.size();) {
        mass += probs[keep++] / sum;
        if (mass >= o_.top_p) break;
      }
    }
    double total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
    double r = std::uniform_real_distribution<double>(0, total)(rng_);
    for (size_t i = 0; i < keep; ++i) {
      r -= probs[i];
      if (r < 0) return order[i];
    }
    return order[keep - 1];
  }

 private:
  const Options& o_;
  std::mt19937_64 rng_;
};

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

Options ParseGenerate(const std::vector<std::string>& args) {
  Options o;
  bool have_prompt = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) Fail(a + " needs a value");
      return args[++i];
    };
    try {
      if (a == "--prompt-ids" || a == "--prompt-ids-file") {
        o.prompt = ParseIds(a == "--prompt-ids" ? value() : ReadFile(value()), a);
        have_prompt = true;
      } else if (a == "--max-new-tokens") o.max_new_tokens = std::stoll(value());
      else if (a == "--eos") o.eos = ParseIds(value(), a);
      else if (a == "--temperature") o.temperature = std::stod(value());
      else if (a == "--top-k") o.top_k = std::stoll(value());
      else if (a == "--top-p") o.top_p = std::stod(value());
      else if (a == "--seed") o.seed = std::stoull(value());
      else if (a == "--threads") o.threads = std::stoi(value());
      else if (a == "--bench") o.bench = o.stats = true;
      else if (a == "--stats") o.stats = true;
      else if (a == "--dump-logits") o.dump_logits = value();
      else Fail("unknown option " + a);
    } catch (const std::logic_error&) {  // std::stoll and friends on a non-number or out of range
      Fail(a + ": '" + args[i] + "' is not a valid number");
    }
  }
  if (!have_prompt) Fail("give the prompt's token ids: --prompt-ids 1,2,3 or --prompt-ids-file FILE");
  if (o.prompt.empty()) Fail("the prompt is empty; give at least one token id");
  if (o.max_new_tokens < 1) Fail("--max-new-tokens must be at least 1");
  if (!(o.temperature >= 0) || o.top_k < 0 || !(o.top_p > 0 && o.top_p <= 1))
    Fail("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]");
  return o;
}

int RunGenerate(const std::vector<std::string>& args) {
  if (args.empty()) Fail("usage: runner generate DIR --prompt-ids 1,2,3 [--max-new-tokens N] ...");
  const std::string dir = args[0];
  Options o = ParseGenerate(args);
  Spec spec = ReadSpec(dir);
  CheckCpu(spec);
  for (int64_t id : o.prompt)
    if (id < 0 || id >= spec.vocab_size)
      Fail("token id " + std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(spec.vocab_size) +
           ")");
  int64_t n = static_cast<int64_t>(o.prompt.size()), limit = o.max_new_tokens;
  if (spec.max_sequence > 0) {
    if (n >= spec.max_sequence)
      Fail("the prompt has " + std::to_string(n) + " tokens; the model's context is " +
           std::to_string(spec.max_sequence) + ", so it must be shorter than that");
    limit = std::min(limit, spec.max_sequence - n);
  }
  SetThreads(o.threads);
  Model model(dir, spec);
  if (o.bench) {  // a warm-up sequence: the first calls allocate the VM's memory pools
    model.Prefill({o.prompt.begin(), o.prompt.begin() + std::min<int64_t>(n, 8)}, n + limit);
    model.Step(o.prompt[0]);
  }
  Sampler sample(o);
  std::vector<float> dumped;
  auto keep = [&](const float* logits) {
    if (!o.dump_logits.empty()) dumped.insert(dumped.end(), logits, logits + spec.vocab_size);
  };
  auto start = std::chrono::steady_clock::now();
  const float* logits = model.Prefill(o.prompt, n + limit);
  keep(logits);
  int64_t token = sample(logits, spec.vocab_size);
  double prompt_s = Seconds(start);
  std::printf("%lld\n", static_cast<long long>(token));
  std::fflush(stdout);
  int64_t made = 1;
  start = std::chrono::steady_clock::now();
  while (made < limit && std::find(o.eos.begin(), o.eos.end(), token) == o.eos.end()) {
    logits = model.Step(token);
    keep(logits);
    token = sample(logits, spec.vocab_size);
    ++made;
    std::printf("%lld\n", static_cast<long long>(token));
    std::fflush(stdout);
  }
  double decode_s = Seconds(start);
  if (!o.dump_logits.empty())
    WriteNpy(o.dump_logits, dumped.data(), {made, spec.vocab_size}, DTypeByName("float32"));
  if (o.stats) {
    std::fprintf(stderr, "prompt: %lld tokens in %.3f s: %.2f tokens/s\n", static_cast<long long>(n), prompt_s,
                 n / prompt_s);
    if (made > 1)
      std::fprintf(stderr, "decode: %lld tokens in %.3f s: %.2f tokens/s\n", static_cast<long long>(made - 1),
                   decode_s, (made - 1) / decode_s);
    else
      std::fprintf(stderr, "decode: no steps (raise --max-new-tokens)\n");
    const char* threads = std::getenv("TVM_NUM_THREADS");
    std::fprintf(stderr, "threads: %s\n", threads ? threads : "TVM's default");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const char* usage =
      "usage: runner func LIB FUNC in.npy ... -- out.npy ...\n"
      "       runner generate DIR --prompt-ids 1,2,3 [--max-new-tokens N] [--bench] ...\n"
      "       runner rpc --tracker HOST:PORT --key KEY [--port 9090] [--threads N]\n";
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    std::fputs(usage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  try {
    std::vector<std::string> rest(args.begin() + 1, args.end());
    if (args[0] == "func") return RunFunc(rest);
    if (args[0] == "generate") return RunGenerate(rest);
    if (args[0] == "rpc") return pbs2pc::RunRpcServer(rest);
    Fail("unknown mode '" + args[0] + "'; use func, generate or rpc");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 2;
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "runner: %s: %s\n", e.kind().c_str(), e.message().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 1;
  }
}
