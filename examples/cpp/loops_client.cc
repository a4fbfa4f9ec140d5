// A C++ backend calling the LOOPS decision service (`loops serve`): Decide, Reward, DecideBatch.
//
// Built from proto/loops/v1/decision.proto with Debian's gRPC packages (see Makefile):
//     make -C examples/cpp            # -> examples/cpp/build/loops_client
//     printf 'player-1 level=12 spend=40.5 country=DE\n' |
//         examples/cpp/build/loops_client --target 127.0.0.1:7071 --reward 12.5 --batch
//
// Requests come on stdin, one per line: the user key (`-` = no user), then `name=value` pairs.
// A value that parses as a number goes into `features`, any other into `categories`;
// `name:=value` always goes into `categories` (a categorical value that looks like a number).
// A `client` token is read from $LOOPS_TOKEN (never from the command line: other users see
// command lines) and sent as `authorization: Bearer ...`; it is only sent to a loopback target,
// as this example speaks plaintext (use grpc::SslCredentials beyond loopback).
//
// `--channels N` spreads the Decide calls round robin over N channels, each with a connection of
// its own (see Connect); `--identical-channels` builds them alike, to show they then share one.
//
// One line per result on stdout, `key=value` fields (probabilities printed exactly, %.17g);
// any failed call prints `loops_client: <call> failed: <CODE>: <message>` on stderr and exits 1,
// bad arguments or input exit 2.

#include <grpcpp/grpcpp.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "loops/v1/decision.grpc.pb.h"

namespace {

struct Options {
  std::string target = "127.0.0.1:7071";
  std::string decision_point = "bonus";
  std::string default_action = "none";
  std::optional<double> reward;
  std::string kind = "deposit";
  bool batch = false;
  int channels = 1;
  bool identical_channels = false;  // to show that identical channels share one connection
  int deadline_ms = 5000;
};

struct Line {
  std::optional<std::string> user;
  std::vector<std::pair<std::string, double>> features;
  std::vector<std::pair<std::string, std::string>> categories;
};

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK: return "OK";
    case grpc::CANCELLED: return "CANCELLED";
    case grpc::UNKNOWN: return "UNKNOWN";
    case grpc::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND: return "NOT_FOUND";
    case grpc::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::ABORTED: return "ABORTED";
    case grpc::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::INTERNAL: return "INTERNAL";
    case grpc::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::DATA_LOSS: return "DATA_LOSS";
    case grpc::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN_CODE";
  }
}

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "loops_client: " << why << "\n"
            << "usage: loops_client [--target HOST:PORT] [--decision-point NAME]"
               " [--default-action ID] [--reward VALUE] [--kind KIND] [--batch]"
               " [--channels N [--identical-channels]] [--deadline-ms MS] < requests\n";
  std::exit(2);
}

// The whole string as a double, or nothing ("12", "-0.5", "inf" parse; "DE", "12x" do not).
std::optional<double> ParseNumber(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || errno == ERANGE) return std::nullopt;
  return v;
}

int ParseInt(const std::string& flag, const std::string& text, int min) {
  auto v = ParseNumber(text);
  if (!v || *v != std::floor(*v) || *v < min || *v > 1e6) {
    Usage(flag + ": expected a whole number >= " + std::to_string(min) + ", got '" + text + "'");
  }
  return static_cast<int>(*v);
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--batch") { o.batch = true; continue; }
    if (flag == "--identical-channels") { o.identical_channels = true; continue; }
    if (flag == "-h" || flag == "--help") Usage("calls Decide (and Reward, DecideBatch)");
    if (i + 1 >= argc) Usage(flag + ": missing value (or unknown flag)");
    std::string value = argv[++i];
    if (flag == "--target") o.target = value;
    else if (flag == "--decision-point") o.decision_point = value;
    else if (flag == "--default-action") o.default_action = value;
    else if (flag == "--kind") o.kind = value;
    else if (flag == "--reward") {
      o.reward = ParseNumber(value);
      if (!o.reward || !std::isfinite(*o.reward)) Usage("--reward: expected a finite number");
    } else if (flag == "--channels") o.channels = ParseInt(flag, value, 1);
    else if (flag == "--deadline-ms") o.deadline_ms = ParseInt(flag, value, 1);
    else Usage("unknown flag " + flag);
  }
  return o;
}

std::vector<Line> ReadLines(std::istream& in) {
  std::vector<Line> lines;
  std::string text;
  for (int number = 1; std::getline(in, text); ++number) {
    std::istringstream words(text);
    std::string user;
    if (!(words >> user)) continue;  // blank line
    Line line;
    if (user != "-") line.user = user;
    for (std::string word; words >> word;) {
      auto eq = word.find('=');
      if (eq == std::string::npos || eq == 0) {
        Usage("stdin line " + std::to_string(number) + ": expected name=value, got '" + word + "'");
      }
      std::string value = word.substr(eq + 1);
      bool text_only = word[eq - 1] == ':';
      std::string name = word.substr(0, text_only ? eq - 1 : eq);
      auto number_value = text_only ? std::nullopt : ParseNumber(value);
      if (number_value) line.features.emplace_back(name, *number_value);
      else line.categories.emplace_back(name, value);
    }
    lines.push_back(std::move(line));
  }
  return lines;
}

bool IsLoopback(std::string target) {
  for (const char* scheme : {"dns:///", "ipv4:", "ipv6:"}) {
    if (target.rfind(scheme, 0) == 0) target = target.substr(std::strlen(scheme));
  }
  std::string host = target.substr(0, target.rfind(':'));  // without the port
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "[::1]";
}

// gRPC C-core shares one connection (subchannel) among channels whose arguments are identical,
// so N channels built alike are one TCP connection, pinned to one `loops serve --processes`
// worker. A distinct argument per channel gives each its own connection; the kernel
// (SO_REUSEPORT) spreads connections over the workers.
std::vector<std::unique_ptr<loops::v1::DecisionService::Stub>> Connect(const Options& o) {
  std::vector<std::unique_ptr<loops::v1::DecisionService::Stub>> stubs;
  for (int i = 0; i < o.channels; ++i) {
    grpc::ChannelArguments args;
    if (!o.identical_channels) args.SetInt("loops.channel_index", i);
    auto channel = grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
    stubs.push_back(loops::v1::DecisionService::NewStub(channel));
  }
  return stubs;
}

class Caller {
 public:
  Caller(const Options& o, std::string token) : options_(o), token_(std::move(token)) {}

  // A fresh context per call: a deadline on every call, and the token when there is one.
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(options_.deadline_ms));
    if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
    return ctx;
  }

  static void Check(const grpc::Status& status, const char* call) {
    if (status.ok()) return;
    std::cerr << "loops_client: " << call << " failed: " << CodeName(status.error_code()) << ": "
              << status.error_message() << "\n";
    std::exit(1);
  }

 private:
  const Options& options_;
  std::string token_;
};

template <typename Request>
void FillRow(const Line& line, Request* r) {
  if (line.user) r->set_user(*line.user);
  for (const auto& [name, value] : line.features) (*r->mutable_features())[name] = value;
  for (const auto& [name, value] : line.categories) (*r->mutable_categories())[name] = value;
}

std::string UserText(const Line& line) { return line.user ? *line.user : "-"; }

}  // namespace

int main(int argc, char** argv) {
  Options o = ParseOptions(argc, argv);
  const char* env_token = std::getenv("LOOPS_TOKEN");
  std::string token = env_token ? env_token : "";
  if (!token.empty() && !IsLoopback(o.target)) {
    Usage("refusing to send $LOOPS_TOKEN in plaintext to " + o.target +
          " (not loopback): use TLS credentials beyond loopback");
  }
  std::vector<Line> lines = ReadLines(std::cin);
  auto stubs = Connect(o);
  Caller caller(o, token);

  for (size_t i = 0; i < lines.size(); ++i) {
    auto& stub = stubs[i % stubs.size()];  // round robin over the channels
    loops::v1::DecideRequest request;
    request.set_decision_point(o.decision_point);
    request.set_default_action(o.default_action);  // answered while the policy is missing
    FillRow(lines[i], &request);
    loops::v1::DecideResponse d;
    auto ctx = caller.Context();
    Caller::Check(stub->Decide(ctx.get(), request, &d), "Decide");
    std::printf("decide %zu user=%s action=%s probability=%.17g reason=%s policy=%s version=%llu "
                "holdout=%d event=%s\n",
                i, UserText(lines[i]).c_str(), d.action().c_str(), d.probability(),
                d.reason().c_str(), d.policy_name().c_str(),
                static_cast<unsigned long long>(d.policy_version()), d.holdout() ? 1 : 0,
                d.event_id().c_str());
    if (o.reward && !d.event_id().empty()) {  // no event id: a default, nothing was logged
      // ... in a real backend, later, when the outcome is known (redeemed, deposited, ...)
      loops::v1::RewardRequest reward;
      reward.set_event_id(d.event_id());
      reward.set_value(*o.reward);
      reward.set_kind(o.kind);
      loops::v1::RewardResponse done;
      auto rctx = caller.Context();
      Caller::Check(stub->Reward(rctx.get(), reward, &done), "Reward");
      std::printf("reward %zu event=%s value=%.17g kind=%s\n", i, d.event_id().c_str(), *o.reward,
                  o.kind.c_str());
    }
  }

  if (o.batch && !lines.empty()) {
    loops::v1::DecideBatchRequest request;
    request.set_decision_point(o.decision_point);
    request.set_default_action(o.default_action);
    for (const auto& line : lines) FillRow(line, request.add_rows());
    loops::v1::DecideBatchResponse b;
    auto ctx = caller.Context();
    Caller::Check(stubs[0]->DecideBatch(ctx.get(), request, &b), "DecideBatch");
    // The answer is columnar: one entry per row in each repeated field.
    if (b.actions_size() != static_cast<int>(lines.size()) ||
        b.probabilities_size() != b.actions_size() || b.event_ids_size() != b.actions_size() ||
        b.reasons_size() != b.actions_size()) {
      std::cerr << "loops_client: DecideBatch failed: " << b.actions_size() << " answers for "
                << lines.size() << " rows\n";
      return 1;
    }
    for (int i = 0; i < b.actions_size(); ++i) {
      std::printf("batch %d user=%s action=%s probability=%.17g reason=%s policy=%s "
                  "version=%llu event=%s\n",
                  i, UserText(lines[i]).c_str(), b.actions(i).c_str(), b.probabilities(i),
                  b.reasons(i).c_str(), b.policy_name().c_str(),
                  static_cast<unsigned long long>(b.policy_version()), b.event_ids(i).c_str());
    }
  }
  std::fflush(stdout);
  return std::ferror(stdout) ? 1 : 0;
}
