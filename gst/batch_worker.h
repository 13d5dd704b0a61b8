/* The batching machinery every gst-vae element shares, without GObject: a work
 * thread that runs batches, a push thread that pushes their outputs in order,
 * the bounded queues between them, the flush generation that fences off
 * outputs from before a flush, the sticky flow return, and the frames-in-flight
 * count. The elements (gstvaebatch.cpp) gather inputs into jobs and hand them
 * over; what a job computes is theirs.
 *
 * Threads: the caller's (the element's streaming thread, or its batch timer
 * holding the stream lock) submits jobs and events and waits for slots; the
 * work thread runs one job at a time; the push thread pushes outputs and
 * events. A job's run() is called with no lock held.
 *
 * Lock order (take left before right, never the reverse):
 *   caller's locks (the sink pad stream lock) -> push_mutex_ -> mutex_
 *   Callbacks are called with none of the worker's locks held, except `push`
 *   and `push_event`, which run under push_mutex_ (so that FLUSH_STOP, which
 *   takes it, knows no output from before the flush is on its way). */
#pragma once

#include <gst/gst.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gstvae_glue {

// A batch handed to the worker. run() is called once, on the work thread.
class BatchJob {
 public:
  virtual ~BatchJob() = default;
  // Inputs it holds (counted in frames-in-flight until its outputs are out).
  // May be 0: a job that only flushes state its model kept from earlier jobs.
  virtual size_t inputs() const = 0;
  // Computes the outputs, in push order, each with its timestamps. Throws
  // std::exception on failure.
  virtual std::vector<GstBuffer*> run() = 0;
  // After run(), on the work thread: a wait for the outputs' contents, when
  // run() left them still being written (the latents' copy from the GPU in
  // flight, GSTVAE_DOWNLOAD_OVERLAP). The push thread calls it, with no lock
  // held, before it pushes them, while the work thread runs the next job. It
  // throws std::exception when the contents will never be right (the job
  // then fails as if run() had thrown). None by default.
  virtual std::function<void()> take_ready_wait() { return {}; }
};

// Threads that stopped their owner themselves (an application changing state
// from a pad probe or a sync bus handler running on them) cannot join
// themselves: they are kept here and joined later, by another thread.
class DeferredJoins {
 public:
  ~DeferredJoins();
  // Joins `t`, or, when the caller is `t`, keeps it for join_others(). Says
  // whether it was joined.
  bool join_or_defer(std::thread& t);
  // Joins the kept threads except the caller.
  void join_others();

 private:
  std::mutex mutex_;
  std::vector<std::thread> kept_;
};

class BatchWorker {
 public:
  struct Callbacks {
    // Push thread, under the push fence: pushes one output downstream.
    std::function<GstFlowReturn(GstBuffer*)> push;
    std::function<void(GstEvent*)> push_event;
    // Work thread (push thread for a failed BatchJob::take_ready_wait): a job
    // failed (and was not flushed away meanwhile).
    std::function<void(const std::string& error)> failed;
    // Work thread: a job gave `outputs` outputs in `elapsed` nanoseconds.
    std::function<void(BatchJob& job, size_t outputs, GstClockTime elapsed)> done;
    // Work or push thread: a job of a flushed stream failed (logged, not an error).
    std::function<void(const std::string& error)> failed_flushed;
  };

  BatchWorker(Callbacks callbacks, DeferredJoins& joins);
  ~BatchWorker();
  BatchWorker(const BatchWorker&) = delete;
  BatchWorker& operator=(const BatchWorker&) = delete;

  // Starts the threads with a clean state (stopping old ones first).
  void start();
  // Drops the queues and joins the threads, the work thread after the job it
  // is running (a forward pass cannot be interrupted); its outputs are dropped.
  void stop();
  bool running() const { return work_thread_.joinable(); }

  // Caller: waits for a free slot, then queues `job`. Returns FLUSHING when
  // flushing, the error when a job or push failed for good (the job is then
  // dropped), and a non-fatal downstream return (NOT_LINKED, EOS) once.
  GstFlowReturn submit(std::unique_ptr<BatchJob> job);
  // Caller: queues a serialized event behind the outputs in flight, without
  // waiting. False when nothing is in flight: the caller forwards it at once.
  bool queue_event(GstEvent* event);
  // Caller: waits until everything submitted is out.
  GstFlowReturn wait_idle();
  // Caller, before taking its input: the sticky flow return. An error stays;
  // NOT_LINKED, FLUSHING and EOS are returned once, as the pad would, so that
  // a relinked or restarted downstream recovers.
  GstFlowReturn take_flow();

  // Any thread: drops what is queued and wakes waiting callers.
  void flush_start();
  // Streaming thread: outputs of jobs submitted before this are dropped.
  void flush_stop();
  // Any thread: wakes a caller waiting for a slot, for stop.
  void set_flushing();

  guint64 inputs_in_flight();
  // Any thread: whether a job or event is queued, running or being pushed
  // (a job of no inputs counts, although inputs_in_flight() does not see it).
  bool busy();

 private:
  struct WorkItem {
    std::unique_ptr<BatchJob> job;  // or
    GstEvent* event = nullptr;      // owned
    guint64 generation = 0;
  };
  struct PushItem {
    std::vector<GstBuffer*> outputs;
    std::function<void()> ready_wait;  // BatchJob::take_ready_wait(), or none
    GstEvent* event = nullptr;  // owned
    size_t inputs = 0;
    guint64 generation = 0;
    void drop();
  };

  void work_loop();
  void push_loop();
  void push_item(PushItem& item);
  void wait_ready(PushItem& item);
  void drop_queues();  // mutex_ held
  bool idle() const { return queue_.empty() && !working_ && out_.empty() && !pushing_; }
  size_t waiting_jobs() const;
  size_t waiting_outputs() const;
  bool failed() const { return flow_ != GST_FLOW_OK && flow_ <= GST_FLOW_NOT_NEGOTIATED; }

  Callbacks cb_;
  DeferredJoins& joins_;
  std::thread work_thread_, push_thread_;
  std::mutex mutex_;  // everything below
  std::condition_variable cond_;
  std::deque<WorkItem> queue_;
  bool working_ = false;
  std::deque<PushItem> out_;
  bool pushing_ = false;
  bool flushing_ = false;
  bool quit_ = false;
  guint64 generation_ = 0;
  GstFlowReturn flow_ = GST_FLOW_OK;
  guint64 inputs_in_flight_ = 0;
  // Held while outputs are pushed. Recursive: an application may (against
  // advice) seek from a probe inside our push, on this thread.
  std::recursive_mutex push_mutex_;
};

}  // namespace gstvae_glue

namespace gstvae_glue {

// Calls `expired` on its own thread once the armed deadline has passed on a
// GstClock: the pipeline's clock while the element has one, so that tests
// drive it with a GstTestClock; the system clock before (while prerolling).
// Re-arming moves the deadline; disarming cancels it. `expired` runs with no
// lock of the timer held (it takes the element's stream lock).
class BatchTimer {
 public:
  // Returns a new reference to the clock to measure time on.
  using ClockSource = std::function<GstClock*()>;
  explicit BatchTimer(DeferredJoins& joins) : joins_(joins) {}
  ~BatchTimer();
  void start(std::function<void()> expired, ClockSource clock);
  void stop();
  // The time now, and (a new reference to) the clock it was read on.
  GstClockTime now(GstClock** clock);
  // Fires at `deadline` on `clock` (a reference is taken).
  void arm(GstClock* clock, GstClockTime deadline);
  // Fires as soon as the timer thread gets to it.
  void arm_now();
  void disarm();
  // For `expired`: whether stop() was called meanwhile.
  bool stopping();

 private:
  void loop();
  void cancel_wait();  // mutex_ held
  DeferredJoins& joins_;
  std::function<void()> expired_;
  ClockSource clock_source_;
  std::thread thread_;
  std::mutex mutex_;  // everything below
  std::condition_variable cond_;
  bool quit_ = false;
  bool armed_ = false;
  GstClock* clock_ = nullptr;       // of the armed deadline
  GstClockTime deadline_ = 0;
  GstClockID waiting_ = nullptr;  // the wait in progress, for unscheduling
  guint64 arms_ = 0;               // bumped by arm/disarm: a wait that ends is stale if it moved
};

}  // namespace gstvae_glue
