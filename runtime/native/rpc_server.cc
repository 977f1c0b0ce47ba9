// The runner's rpc mode: a TVM RPC server for `pbs2pc tune --rpc-tracker` on a board without Python.
//
//   runner rpc --tracker HOST:PORT --key KEY [--host 0.0.0.0] [--port 9090] [--port-end 9199] [--threads N]
//
// It speaks the protocol of TVM's Python server (python -m tvm.exec.rpc_server), so TVM's tracker and
// MetaSchedule's RPCRunner work with it unchanged: it registers with the tracker (length-prefixed JSON
// messages), offers itself under KEY, waits for the client the tracker matched to it, checks the client's
// key, and serves the session with TVM's own RPC loop (rpc.ServerLoop of libtvm_runtime) in a child
// process, in a fresh work folder where uploaded libraries land (removed afterwards). One session at a
// time, as the Python server; a session that outlives the client's -timeout is killed. A library that
// crashes kills its session's child, not the server.
//
// Exit status: 2 bad usage, 1 the tracker could not be reached for a minute; otherwise it serves until killed.

#include "rpc_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pbs2pc {
namespace {

namespace ffi = tvm::ffi;

// tvm/rpc/base.py
constexpr int32_t kRpcMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int32_t kCodeSuccess = kRpcMagic + 0;
constexpr int32_t kCodeMismatch = kRpcMagic + 2;
enum TrackerCode { kSuccess = 0, kPut = 3, kUpdateInfo = 5, kGetPendingMatchKeys = 7 };
// The Python server's: ping the tracker every 2 s while waiting; a key handed to a client that has not
// connected for 4 s more is replaced.
constexpr int kPingMs = 2000;
constexpr int kUnmatchedMs = 4000;
constexpr int kTrackerRetryS = 60;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The tracker or a client went away: the server reconnects or waits for the next client.
struct SocketError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string tracker_host;
  int tracker_port = 0;
  std::string key;
  std::string host = "0.0.0.0";
  int port = 9090;
  int port_end = 9199;
  int threads = 0;
};

int ParsePort(const std::string& text, const std::string& what) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value <= 0 || value > 65535)
    throw UsageError(what + " must be a port number (1-65535), got '" + text + "'");
  return static_cast<int>(value);
}

Options ParseOptions(const std::vector<std::string>& args) {
  Options o;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (i + 1 >= args.size()) throw UsageError(flag + " needs a value");
    const std::string& value = args[++i];
    if (flag == "--tracker") {
      size_t colon = value.rfind(':');
      if (colon == std::string::npos || colon == 0)
        throw UsageError("--tracker must be HOST:PORT, got '" + value + "'");
      o.tracker_host = value.substr(0, colon);
      o.tracker_port = ParsePort(value.substr(colon + 1), "--tracker's port");
    } else if (flag == "--key") {
      o.key = value;
    } else if (flag == "--host") {
      o.host = value;
    } else if (flag == "--port") {
      o.port = ParsePort(value, "--port");
    } else if (flag == "--port-end") {
      o.port_end = ParsePort(value, "--port-end");
    } else if (flag == "--threads") {
      o.threads = std::atoi(value.c_str());
      if (o.threads <= 0) throw UsageError("--threads must be a positive number, got '" + value + "'");
    } else {
      throw UsageError("unknown option " + flag + " (rpc takes --tracker, --key, --host, --port, --port-end, "
                       "--threads)");
    }
  }
  if (o.tracker_host.empty()) throw UsageError("rpc needs --tracker HOST:PORT (TVM's RPC tracker)");
  if (o.key.empty()) throw UsageError("rpc needs --key KEY (the name the tuner asks the tracker for)");
  for (char c : o.key)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.')
      throw UsageError("--key may hold letters, digits, '-', '_' and '.' only, got '" + o.key + "'");
  if (o.port_end <= o.port) o.port_end = o.port + 1;
  return o;
}

// ---- sockets ------------------------------------------------------------------------------------------

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& other) noexcept : fd_(other.Release()) {}
  Fd& operator=(Fd&& other) noexcept {
    Reset(other.Release());
    return *this;
  }
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  int Release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void Reset(int fd = -1) {
    if (fd_ >= 0) close(fd_);
    fd_ = fd;
  }

 private:
  int fd_;
};

void SendAll(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = send(fd, p, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SocketError(std::string("send: ") + std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void RecvAll(int fd, void* data, size_t size) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = recv(fd, p, size, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) throw SocketError("the peer closed the connection");
    if (n < 0) throw SocketError(std::string("recv: ") + std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Integers go little-endian (struct.pack("<i")): every machine this runs on is little-endian.
void SendInt(int fd, int32_t value) { SendAll(fd, &value, sizeof(value)); }

int32_t RecvInt(int fd) {
  int32_t value = 0;
  RecvAll(fd, &value, sizeof(value));
  return value;
}

void SendString(int fd, const std::string& text) {
  SendInt(fd, static_cast<int32_t>(text.size()));
  SendAll(fd, text.data(), text.size());
}

std::string RecvString(int fd) {
  int32_t size = RecvInt(fd);
  if (size < 0 || size > (1 << 20)) throw SocketError("a message of " + std::to_string(size) + " bytes");
  std::string text(static_cast<size_t>(size), '\0');
  RecvAll(fd, text.data(), text.size());
  return text;
}

// One request to the tracker, whose answers here are a JSON number (0: success) or a list.
std::string Ask(int tracker, const std::string& json) {
  SendString(tracker, json);
  return RecvString(tracker);
}

void Expect(int tracker, const std::string& json) {
  std::string answer = Ask(tracker, json);
  if (answer != std::to_string(kSuccess)) throw SocketError("the tracker answered " + answer + " to " + json);
}

Fd Connect(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0 || found == nullptr)
    throw SocketError("cannot resolve " + host);
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    Fd fd(socket(a->ai_family, a->ai_socktype, a->ai_protocol));
    if (fd.get() >= 0 && connect(fd.get(), a->ai_addr, a->ai_addrlen) == 0) {
      freeaddrinfo(found);
      return fd;
    }
  }
  freeaddrinfo(found);
  throw SocketError("cannot connect to " + host + ":" + std::to_string(port));
}

// A listening socket on the first free port of [port, port_end); returns it and sets *bound.
Fd Listen(const std::string& host, int port, int port_end, int* bound) {
  for (int p = port; p < port_end; ++p) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* found = nullptr;
    if (getaddrinfo(host.c_str(), std::to_string(p).c_str(), &hints, &found) != 0 || found == nullptr)
      throw UsageError("cannot resolve --host " + host);
    Fd fd(socket(found->ai_family, found->ai_socktype, found->ai_protocol));
    int on = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    bool ok = fd.get() >= 0 && bind(fd.get(), found->ai_addr, found->ai_addrlen) == 0 && listen(fd.get(), 1) == 0;
    freeaddrinfo(found);
    if (ok) {
      *bound = p;
      return fd;
    }
  }
  throw UsageError("no free port in [" + std::to_string(port) + ", " + std::to_string(port_end) + ") on " + host +
                   "; choose others with --port and --port-end");
}

// ---- the tracker --------------------------------------------------------------------------------------

std::string Quote(const std::string& text) { return "\"" + text + "\""; }  // keys are checked: no escapes

std::string NewMatchKey(const std::string& key) {
  static std::mt19937_64 rng(std::random_device{}());
  return key + ":" + std::to_string(rng() % 1000000000000ULL);
}

Fd ConnectTracker(const Options& o, int port) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(kTrackerRetryS);
  while (true) {
    try {
      Fd tracker = Connect(o.tracker_host, o.tracker_port);
      SendInt(tracker.get(), kTrackerMagic);
      if (RecvInt(tracker.get()) != kTrackerMagic)
        throw UsageError(o.tracker_host + ":" + std::to_string(o.tracker_port) + " is not a TVM RPC tracker");
      Expect(tracker.get(), "[" + std::to_string(kUpdateInfo) + ", {\"key\": " + Quote("server:" + o.key) +
                                ", \"addr\": [null, " + std::to_string(port) + "]}]");
      return tracker;
    } catch (const SocketError& e) {
      if (std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error("cannot reach the RPC tracker at " + o.tracker_host + ":" +
                                 std::to_string(o.tracker_port) + " (" + e.what() +
                                 "); start it with python -m tvm.exec.rpc_tracker");
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
  }
}

void Put(int tracker, const Options& o, int port, const std::string& match_key) {
  Expect(tracker, "[" + std::to_string(kPut) + ", " + Quote(o.key) + ", [" + std::to_string(port) + ", " +
                      Quote(match_key) + "], null]");
}

// Waits for the client the tracker matched to this server and answers its handshake; returns its socket
// and the session timeout it asked for (0: none).
Fd AcceptClient(int listener, int tracker, const Options& o, int port, double* timeout_s) {
  std::string match_key = NewMatchKey(o.key);
  Put(tracker, o, port, match_key);
  int unmatched_ms = 0;
  while (true) {
    pollfd p{listener, POLLIN, 0};
    int ready = poll(&p, 1, kPingMs);
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      std::string pending = Ask(tracker, "[" + std::to_string(kGetPendingMatchKeys) + "]");
      // a key the tracker gave a client that never came: offer a new one
      unmatched_ms = pending.find(Quote(match_key)) == std::string::npos ? unmatched_ms + kPingMs : 0;
      if (unmatched_ms > kUnmatchedMs + kPingMs) {
        match_key = NewMatchKey(o.key);
        Put(tracker, o, port, match_key);
        unmatched_ms = 0;
      }
      continue;
    }
    Fd client(accept(listener, nullptr, nullptr));
    if (client.get() < 0) continue;
    try {
      if (RecvInt(client.get()) != kRpcMagic) continue;
      std::string header = RecvString(client.get());  // "client:MATCHKEY [-timeout=S]"
      std::string first = header.substr(0, header.find(' '));
      if (first != "client:" + match_key) {
        SendInt(client.get(), kCodeMismatch);
        std::fprintf(stderr, "runner rpc: a client with another key (%s): refused\n", first.c_str());
        continue;
      }
      SendInt(client.get(), kCodeSuccess);
      SendString(client.get(), "server:" + o.key);
      *timeout_s = 0;
      size_t at = header.find("-timeout=");
      if (at != std::string::npos) *timeout_s = std::atof(header.c_str() + at + 9);
      return client;
    } catch (const SocketError&) {
      continue;  // a client that went away during the handshake
    }
  }
}

// ---- a session ----------------------------------------------------------------------------------------

void RemoveFolder(const std::string& path) {
  if (DIR* dir = opendir(path.c_str())) {
    while (dirent* entry = readdir(dir)) {
      std::string name = entry->d_name;
      if (name != "." && name != "..") unlink((path + "/" + name).c_str());
    }
    closedir(dir);
  }
  rmdir(path.c_str());
}

// In the child: the functions the client calls by name that the runtime leaves to the server (TVM's
// Python server registers the same two), then TVM's RPC loop until the client closes the session.
[[noreturn]] void ServeChild(int client, const std::string& work) {
  try {
    if (chdir(work.c_str()) != 0) throw std::runtime_error("cannot enter " + work);
    ffi::Function::SetGlobal("tvm.rpc.server.workpath",
                             ffi::Function::FromTyped([work](ffi::String name) -> ffi::String {
                               return ffi::String(work + "/" + std::string(name));
                             }),
                             true);
    ffi::Function::SetGlobal("tvm.rpc.server.load_module",
                             ffi::Function::FromTyped([work](ffi::String name) -> ffi::Module {
                               return ffi::Module::LoadFromFile(ffi::String(work + "/" + std::string(name)));
                             }),
                             true);
    ffi::Function::GetGlobalRequired("rpc.ServerLoop")(client);
    _exit(0);
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "runner rpc: session: %s: %s\n", e.kind().c_str(), e.message().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "runner rpc: session: %s\n", e.what());
  }
  _exit(1);
}

void Serve(Fd client, double timeout_s, int listener, int tracker) {
  char folder[] = "/tmp/pbs2pc-rpc-XXXXXX";
  if (mkdtemp(folder) == nullptr) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
  pid_t child = fork();
  if (child < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (child == 0) {
    close(listener);
    close(tracker);
    ServeChild(client.get(), folder);
  }
  client.Reset();  // the child holds the session's socket now
  auto start = std::chrono::steady_clock::now();
  int status = 0;
  while (waitpid(child, &status, WNOHANG) == 0) {
    double held = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeout_s > 0 && held > timeout_s) {
      std::fprintf(stderr, "runner rpc: the session passed its %.0f s timeout: killed\n", timeout_s);
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (WIFSIGNALED(status) && WTERMSIG(status) != SIGKILL)
    std::fprintf(stderr, "runner rpc: a session died of signal %d (%s); serving the next one\n", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
  RemoveFolder(folder);
}

}  // namespace

int RunRpcServer(const std::vector<std::string>& args) {
  Options o;
  try {
    o = ParseOptions(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 2;
  }
  if (o.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(o.threads).c_str(), 1);  // sessions inherit it
  // A client gone mid-reply makes the write fail (the session ends with an error line), as in TVM's Python
  // server, instead of SIGPIPE killing the session's process.
  signal(SIGPIPE, SIG_IGN);
  int port = 0;
  Fd listener;
  try {
    listener = Listen(o.host, o.port, o.port_end, &port);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 2;
  }
  std::fprintf(stderr, "runner rpc: listening on %s:%d, key %s, tracker %s:%d\n", o.host.c_str(), port,
               o.key.c_str(), o.tracker_host.c_str(), o.tracker_port);
  Fd tracker;
  while (true) {
    try {
      if (tracker.get() < 0) tracker = ConnectTracker(o, port);
      double timeout_s = 0;
      Fd client = AcceptClient(listener.get(), tracker.get(), o, port, &timeout_s);
      Serve(std::move(client), timeout_s, listener.get(), tracker.get());
    } catch (const SocketError& e) {
      std::fprintf(stderr, "runner rpc: lost the tracker (%s): reconnecting\n", e.what());
      tracker.Reset();
    } catch (const UsageError& e) {
      std::fprintf(stderr, "runner: %s\n", e.what());
      return 2;
    }
  }
}

}  // namespace pbs2pc
