// The runner's rpc mode (rpc_server.cc): a TVM RPC server that registers with TVM's RPC tracker.
#pragma once

#include <string>
#include <vector>

namespace pbs2pc {

// runner rpc --tracker HOST:PORT --key KEY [--host H] [--port P] [--port-end E] [--threads N]
int RunRpcServer(const std::vector<std::string>& args);

}  // namespace pbs2pc
