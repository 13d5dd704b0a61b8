// The GObject-free batching machinery on its own, with a fake model: order of
// outputs and events, the bounded queues, flushes fencing off old outputs, the
// sticky flow return, inputs in flight, stop during a job, and the timer.
#include <gst/check/gsttestclock.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "batch_worker.h"

namespace {

using gstvae_glue::BatchJob;
using gstvae_glue::BatchTimer;
using gstvae_glue::BatchWorker;
using gstvae_glue::DeferredJoins;
using namespace std::chrono_literals;

class GstEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { gst_init(nullptr, nullptr); }
};
::testing::Environment* const gst_env = ::testing::AddGlobalTestEnvironment(new GstEnvironment);

// A gate a fake job waits on, so that tests decide when a "forward pass" ends.
struct Gate {
  std::mutex m;
  std::condition_variable cv;
  bool open = true;
  int waiting = 0;
  void close() {
    std::lock_guard<std::mutex> l(m);
    open = false;
  }
  void release() {
    std::lock_guard<std::mutex> l(m);
    open = true;
    cv.notify_all();
  }
  void pass() {
    std::unique_lock<std::mutex> l(m);
    waiting++;
    cv.notify_all();
    cv.wait(l, [&] { return open; });
    waiting--;
  }
  bool wait_for_waiter(std::chrono::milliseconds t = 5000ms) {
    std::unique_lock<std::mutex> l(m);
    return cv.wait_for(l, t, [&] { return waiting > 0; });
  }
};

// Outputs one buffer per input, its offset the input's number.
class FakeJob : public BatchJob {
 public:
  FakeJob(std::vector<guint64> ids, Gate* gate = nullptr, bool fail = false)
      : ids_(std::move(ids)), gate_(gate), fail_(fail) {}
  size_t inputs() const override { return ids_.size(); }
  std::vector<GstBuffer*> run() override {
    if (gate_) gate_->pass();
    if (fail_) throw std::runtime_error("fake model failed on purpose");
    std::vector<GstBuffer*> out;
    for (guint64 id : ids_) {
      GstBuffer* b = gst_buffer_new();
      GST_BUFFER_OFFSET(b) = id;
      out.push_back(b);
    }
    return out;
  }

 private:
  std::vector<guint64> ids_;
  Gate* gate_;
  bool fail_;
};

// What downstream saw: output offsets and event names, in order.
struct Downstream {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::string> seen;
  GstFlowReturn ret = GST_FLOW_OK;
  Gate gate;  // closed: a push waits (a syncing or prerolling sink)
  std::vector<std::string> errors;
  size_t done_jobs = 0;

  BatchWorker::Callbacks callbacks() {
    BatchWorker::Callbacks cb;
    cb.push = [this](GstBuffer* b) {
      gate.pass();
      std::lock_guard<std::mutex> l(m);
      seen.push_back(std::to_string(GST_BUFFER_OFFSET(b)));
      gst_buffer_unref(b);
      cv.notify_all();
      return ret;
    };
    cb.push_event = [this](GstEvent* e) {
      std::lock_guard<std::mutex> l(m);
      seen.push_back(GST_EVENT_TYPE_NAME(e));
      gst_event_unref(e);
      cv.notify_all();
    };
    cb.failed = [this](const std::string& e) {
      std::lock_guard<std::mutex> l(m);
      errors.push_back(e);
    };
    cb.done = [this](BatchJob&, size_t, GstClockTime) {
      std::lock_guard<std::mutex> l(m);
      done_jobs++;
    };
    return cb;
  }
  std::vector<std::string> snapshot() {
    std::lock_guard<std::mutex> l(m);
    return seen;
  }
  bool wait_for(size_t n, std::chrono::milliseconds t = 5000ms) {
    std::unique_lock<std::mutex> l(m);
    return cv.wait_for(l, t, [&] { return seen.size() >= n; });
  }
};

std::unique_ptr<BatchJob> job(std::vector<guint64> ids, Gate* gate = nullptr, bool fail = false) {
  return std::make_unique<FakeJob>(std::move(ids), gate, fail);
}

TEST(BatchWorker, OutputsAndEventsInOrder) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  EXPECT_EQ(w.submit(job({0, 1})), GST_FLOW_OK);
  EXPECT_TRUE(w.queue_event(gst_event_new_tag(gst_tag_list_new_empty())));
  EXPECT_EQ(w.submit(job({2})), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"0", "1", "tag", "2"}));
  EXPECT_EQ(w.inputs_in_flight(), 0u);
  // Nothing in flight: an event is the caller's to forward.
  GstEvent* e = gst_event_new_tag(gst_tag_list_new_empty());
  EXPECT_FALSE(w.queue_event(e));
  gst_event_unref(e);
  w.stop();
}

TEST(BatchWorker, BoundedWhileDownstreamHolds) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  down.gate.close();
  // Job 1 is pushed (held by downstream), job 2 waits behind it, job 3 runs
  // and waits for room, job 4 waits in the queue: the caller returns at once
  // for all four, and the fifth submit waits.
  for (guint64 i = 0; i < 4; ++i) ASSERT_EQ(w.submit(job({i})), GST_FLOW_OK);
  ASSERT_TRUE(down.gate.wait_for_waiter());
  std::atomic<bool> returned{false};
  std::thread fifth([&] {
    w.submit(job({4}));
    returned = true;
  });
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(returned.load()) << "the queues are not bounded";
  EXPECT_EQ(w.inputs_in_flight(), 4u);
  down.gate.release();
  fifth.join();
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"0", "1", "2", "3", "4"}));
  w.stop();
}

TEST(BatchWorker, FlushFencesOffOldOutputs) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  Gate model;
  model.close();
  ASSERT_EQ(w.submit(job({0, 1}, &model)), GST_FLOW_OK);
  ASSERT_TRUE(model.wait_for_waiter());
  ASSERT_EQ(w.submit(job({2})), GST_FLOW_OK);  // queued behind the running job
  w.flush_start();
  EXPECT_EQ(w.submit(job({3})), GST_FLOW_FLUSHING);
  w.flush_stop();
  model.release();  // the job from before the flush ends now: its outputs are stale
  ASSERT_EQ(w.submit(job({4})), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"4"}));
  EXPECT_EQ(w.inputs_in_flight(), 0u);
  w.stop();
}

TEST(BatchWorker, FailedJobIsStickyAndReported) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  ASSERT_EQ(w.submit(job({0}, nullptr, true)), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_ERROR);
  EXPECT_EQ(w.take_flow(), GST_FLOW_ERROR);
  EXPECT_EQ(w.take_flow(), GST_FLOW_ERROR) << "an error must stay";
  EXPECT_EQ(w.submit(job({1})), GST_FLOW_ERROR);
  ASSERT_EQ(down.errors.size(), 1u);
  EXPECT_NE(down.errors[0].find("on purpose"), std::string::npos);
  EXPECT_TRUE(down.snapshot().empty());
  w.flush_start();
  w.flush_stop();  // a flushing seek recovers from it
  EXPECT_EQ(w.take_flow(), GST_FLOW_OK);
  w.stop();
}

TEST(BatchWorker, NotLinkedReturnedOnce) {
  Downstream down;
  down.ret = GST_FLOW_NOT_LINKED;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  ASSERT_EQ(w.submit(job({0, 1})), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_NOT_LINKED);
  EXPECT_EQ(down.snapshot().size(), 1u) << "the push stops at the first failure";
  EXPECT_EQ(w.take_flow(), GST_FLOW_NOT_LINKED);
  EXPECT_EQ(w.take_flow(), GST_FLOW_OK) << "NOT_LINKED goes upstream once";
  w.stop();
}

TEST(BatchWorker, StopDuringAJobDropsItsOutputs) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  Gate model;
  model.close();
  ASSERT_EQ(w.submit(job({0}, &model)), GST_FLOW_OK);
  ASSERT_TRUE(model.wait_for_waiter());
  std::thread stopper([&] { w.stop(); });
  std::this_thread::sleep_for(100ms);
  model.release();
  stopper.join();
  EXPECT_TRUE(down.snapshot().empty());
  EXPECT_EQ(w.inputs_in_flight(), 0u);
  // And starts again clean.
  w.start();
  ASSERT_EQ(w.submit(job({7})), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"7"}));
  w.stop();
}

// Outputs `n` buffers (offsets 1000, 1001, ...) from no inputs: a temporal
// model's clip end, emitting what its session held from earlier jobs.
class NoInputJob : public BatchJob {
 public:
  explicit NoInputJob(size_t n, Gate* gate = nullptr) : n_(n), gate_(gate) {}
  size_t inputs() const override { return 0; }
  std::vector<GstBuffer*> run() override {
    if (gate_) gate_->pass();
    std::vector<GstBuffer*> out;
    for (size_t i = 0; i < n_; ++i) {
      GstBuffer* b = gst_buffer_new();
      GST_BUFFER_OFFSET(b) = 1000 + i;
      out.push_back(b);
    }
    return out;
  }

 private:
  size_t n_;
  Gate* gate_;
};

TEST(BatchWorker, JobsOfNoInputsRunInOrder) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  EXPECT_FALSE(w.busy());
  Gate model;
  model.close();
  ASSERT_EQ(w.submit(job({0, 1})), GST_FLOW_OK);
  ASSERT_EQ(w.submit(std::make_unique<NoInputJob>(1, &model)), GST_FLOW_OK);
  ASSERT_TRUE(model.wait_for_waiter());
  // Its inputs are not in flight, but the job is: events wait behind it.
  EXPECT_TRUE(w.busy());
  EXPECT_TRUE(w.queue_event(gst_event_new_tag(gst_tag_list_new_empty())));
  ASSERT_EQ(w.submit(std::make_unique<NoInputJob>(0)), GST_FLOW_OK);  // nothing to emit
  model.release();
  ASSERT_EQ(w.submit(job({2})), GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_FALSE(w.busy());
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"0", "1", "1000", "tag", "2"}));
  EXPECT_EQ(w.inputs_in_flight(), 0u);
  EXPECT_EQ(down.done_jobs, 4u);
  w.stop();
}

// The timer waits on the clock it is given: a GstTestClock moves it, real
// time does not.
// A job whose outputs are still being written when run() returns (the
// latents' copy from the GPU in flight, GSTVAE_DOWNLOAD_OVERLAP): its ready
// wait blocks on `copy` and records when it returns.
class OverlappedJob : public FakeJob {
 public:
  OverlappedJob(std::vector<guint64> ids, Gate* copy, std::vector<std::string>* log, std::mutex* log_mutex,
                bool copy_fails = false)
      : FakeJob(ids), first_(ids.at(0)), copy_(copy), log_(log), log_mutex_(log_mutex), copy_fails_(copy_fails) {}
  std::vector<GstBuffer*> run() override {
    note("run " + std::to_string(first_));
    return FakeJob::run();
  }
  std::function<void()> take_ready_wait() override {
    return [this, copy = copy_, first = first_, fails = copy_fails_, log = log_, m = log_mutex_] {
      copy->pass();
      {
        std::lock_guard<std::mutex> l(*m);
        log->push_back("ready " + std::to_string(first));
      }
      if (fails) throw std::runtime_error("the device failed the copy");
    };
  }

 private:
  void note(const std::string& what) {
    std::lock_guard<std::mutex> l(*log_mutex_);
    log_->push_back(what);
  }
  guint64 first_;
  Gate* copy_;
  std::vector<std::string>* log_;
  std::mutex* log_mutex_;
  bool copy_fails_;
};

TEST(BatchWorker, OutputsWaitForTheirCopyWhileTheNextJobRuns) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  std::mutex log_mutex;
  std::vector<std::string> log;
  Gate copy;
  copy.close();  // job 0's copy is still in flight
  ASSERT_EQ(w.submit(std::make_unique<OverlappedJob>(std::vector<guint64>{0, 1}, &copy, &log, &log_mutex)),
            GST_FLOW_OK);
  ASSERT_TRUE(copy.wait_for_waiter());
  // The push thread waits for job 0's copy; the work thread is free: job 2 runs.
  Gate second_copy;
  ASSERT_EQ(w.submit(std::make_unique<OverlappedJob>(std::vector<guint64>{2}, &second_copy, &log, &log_mutex)),
            GST_FLOW_OK);
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  for (;;) {
    {
      std::lock_guard<std::mutex> l(log_mutex);
      if (log.size() >= 2) break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the next job did not run during the copy";
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(down.snapshot().empty()) << "outputs pushed before their copy ended";
  copy.release();
  EXPECT_EQ(w.wait_idle(), GST_FLOW_OK);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"0", "1", "2"}));
  std::lock_guard<std::mutex> l(log_mutex);
  EXPECT_EQ(log, (std::vector<std::string>{"run 0", "run 2", "ready 0", "ready 2"}));
  w.stop();
}

TEST(BatchWorker, AFailedCopyFailsItsJobAndDropsItsOutputs) {
  Downstream down;
  DeferredJoins joins;
  BatchWorker w(down.callbacks(), joins);
  w.start();
  std::mutex log_mutex;
  std::vector<std::string> log;
  Gate copy;
  ASSERT_EQ(w.submit(job({0})), GST_FLOW_OK);
  ASSERT_EQ(w.submit(std::make_unique<OverlappedJob>(std::vector<guint64>{1, 2}, &copy, &log, &log_mutex,
                                                     /*copy_fails=*/true)),
            GST_FLOW_OK);
  EXPECT_EQ(w.wait_idle(), GST_FLOW_ERROR);
  EXPECT_EQ(down.snapshot(), (std::vector<std::string>{"0"}));
  ASSERT_EQ(down.errors.size(), 1u);
  EXPECT_NE(down.errors[0].find("the device failed the copy"), std::string::npos);
  EXPECT_EQ(w.submit(job({3})), GST_FLOW_ERROR) << "the failure is sticky";
  EXPECT_EQ(w.inputs_in_flight(), 0u);
  w.stop();
}

TEST(BatchTimer, FiresOnTheTestClockDeadlineOnlyAndNotWhenDisarmed) {
  GstClock* clock = gst_test_clock_new_with_start_time(GST_SECOND);
  GstTestClock* test_clock = GST_TEST_CLOCK(clock);
  DeferredJoins joins;
  BatchTimer timer(joins);
  std::atomic<int> fired{0};
  timer.start([&] { fired++; }, [clock] { return GST_CLOCK(gst_object_ref(clock)); });
  GstClock* c = nullptr;
  const GstClockTime t0 = timer.now(&c);
  EXPECT_EQ(c, clock);
  EXPECT_EQ(t0, GST_SECOND);
  gst_object_unref(c);

  timer.arm(clock, t0 + 100 * GST_MSECOND);
  gst_test_clock_wait_for_next_pending_id(test_clock, nullptr);  // the timer waits on it
  std::this_thread::sleep_for(200ms);  // real time passes: nothing fires
  EXPECT_EQ(fired.load(), 0);
  gst_test_clock_set_time(test_clock, t0 + 99 * GST_MSECOND);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(fired.load(), 0);
  gst_test_clock_set_time(test_clock, t0 + 100 * GST_MSECOND);
  gst_test_clock_crank(test_clock);
  for (int i = 0; i < 500 && fired.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(fired.load(), 1);

  // Re-armed to a later deadline, then disarmed: nothing fires at either.
  timer.arm(clock, t0 + 300 * GST_MSECOND);
  timer.arm(clock, t0 + 400 * GST_MSECOND);
  timer.disarm();
  gst_test_clock_set_time(test_clock, t0 + GST_SECOND);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(fired.load(), 1);
  timer.stop();
  gst_object_unref(clock);
}

}  // namespace
