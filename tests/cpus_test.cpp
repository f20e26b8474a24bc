// The CPUs the server may use and the thread layout it takes from them: cgroup CPU limits read
// from cgroupfs files as the kernel writes them (v2 and v1), and the server program itself
// started under a CPU affinity limit (taskset), as in a pod or a pinned container.
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unistd.h>

#include "cpus.hpp"

namespace syncbatch::http {
namespace {

namespace fs = std::filesystem;

class CgroupFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("syncbatch_cgroup_" + std::to_string(::getpid()));
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  void write(const fs::path& relative, const std::string& text) {
    fs::create_directories((root_ / relative).parent_path());
    std::ofstream(root_ / relative) << text << "\n";
  }
  fs::path root_;
};

TEST_F(CgroupFiles, AV2LimitIsTheTightestAlongThePathToTheRoot) {
  write("kubepods/pod1/cpu.max", "150000 100000");
  write("kubepods/pod1/ctr/cpu.max", "max 100000");
  write("kubepods/cpu.max", "400000 100000");
  const auto limit = cgroup_cpu_limit("0::/kubepods/pod1/ctr\n", root_);
  ASSERT_TRUE(limit.has_value());
  EXPECT_DOUBLE_EQ(*limit, 1.5);
  EXPECT_EQ((CpuBudget{.affinity = 16, .quota = limit}).usable(), 2u);  // 1.5 rounds up
}

TEST_F(CgroupFiles, NoLimitWhereEveryFileSaysMaxOrIsMissing) {
  write("cpu.max", "max 100000");
  EXPECT_FALSE(cgroup_cpu_limit("0::/\n", root_).has_value());
  EXPECT_FALSE(cgroup_cpu_limit("0::/not/there\n", root_).has_value());
  EXPECT_FALSE(cgroup_cpu_limit("garbage", root_).has_value());
  EXPECT_EQ((CpuBudget{.affinity = 6, .quota = std::nullopt}).usable(), 6u);
}

TEST_F(CgroupFiles, AV1LimitComesFromTheCpuController) {
  write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000");
  write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000");
  write("memory/docker/abc/cpu.cfs_quota_us", "100000");  // not the cpu controller's
  const auto limit = cgroup_cpu_limit("12:memory:/docker/abc\n5:cpu,cpuacct:/docker/abc\n", root_);
  ASSERT_TRUE(limit.has_value());
  EXPECT_DOUBLE_EQ(*limit, 3.0);
  write("cpu,cpuacct/other/cpu.cfs_quota_us", "-1");
  write("cpu,cpuacct/other/cpu.cfs_period_us", "100000");
  EXPECT_FALSE(cgroup_cpu_limit("5:cpu,cpuacct:/other\n", root_).has_value());
}

TEST(ThreadLayout, HalfTheCpusAsIoThreadsAndTwoWorkersOnCuda) {
  EXPECT_EQ(default_layout(1, false).io_threads, 1);
  EXPECT_EQ(default_layout(2, false).io_threads, 1);
  EXPECT_EQ(default_layout(4, true).io_threads, 2);
  EXPECT_EQ(default_layout(16, true).io_threads, 8);
  EXPECT_EQ(default_layout(128, true).io_threads, 8);
  EXPECT_EQ(default_layout(16, true).workers, 2u);
  EXPECT_EQ(default_layout(16, false).workers, 1u);
}

// The server program under `taskset -c 0` sees one CPU and says the layout it took from it; the
// flags still override.
TEST(ThreadLayout, TheServerStartedUnderACpuLimitTakesItsLayoutFromIt) {
  // The lines the server prints until it listens; then SIGTERM, which drains and exits 0.
  const auto run = [](std::vector<std::string> flags) {
    std::vector<std::string> args{"taskset", "-c",     "0",        SYNCBATCH_HTTP_SERVER_BIN,
                                  "--port",  "0",      "--device", "cpu",
                                  "--model", "mlp:1x8"};
    args.insert(args.end(), flags.begin(), flags.end());
    int out[2];
    EXPECT_EQ(::pipe(out), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(out[1], 1);
      ::dup2(out[1], 2);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execvp(argv[0], argv.data());
      std::_Exit(127);
    }
    ::close(out[1]);
    std::string text;
    char buf[256];
    for (ssize_t n; text.find("listening on") == std::string::npos &&
                    (n = ::read(out[0], buf, sizeof buf)) > 0;)
      text.append(buf, static_cast<std::size_t>(n));
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ::close(out[0]);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;
    return text;
  };
  const std::string automatic = run({});
  EXPECT_NE(automatic.find("threads: 1 io thread; workers: 'model' 1 (1 CPU usable (affinity 1"),
            std::string::npos)
      << automatic;
  const std::string chosen = run({"--threads", "3", "--workers", "2"});
  EXPECT_NE(chosen.find("threads: 3 io threads; workers: 'model' 2 (1 CPU usable"),
            std::string::npos)
      << chosen;
  EXPECT_EQ(chosen.find("auto:"), std::string::npos) << chosen;
}

}  // namespace
}  // namespace syncbatch::http
