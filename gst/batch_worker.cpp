#include "batch_worker.h"

#include <algorithm>
#include <chrono>
#include <exception>

GST_DEBUG_CATEGORY_STATIC(batch_worker_debug);
#define GST_CAT_DEFAULT batch_worker_debug

namespace gstvae_glue {

namespace {
// Jobs handed over and waiting while another runs: one keeps the model busy;
// more would only add latency and memory.
constexpr size_t kMaxWaitingJobs = 1;
// Finished jobs waiting while the outputs of another are pushed: one lets the
// model start the next job while a syncing sink holds the last outputs.
constexpr size_t kMaxWaitingOutputs = 1;

void init_debug() {
  static std::once_flag once;
  std::call_once(once, [] { GST_DEBUG_CATEGORY_INIT(batch_worker_debug, "vaebatchworker", 0, "gst-vae batching"); });
}
}  // namespace

/* --------------------------------------------------------- DeferredJoins */

DeferredJoins::~DeferredJoins() {
  join_others();
  // Destroyed from that very thread: nothing else can join it.
  for (std::thread& t : kept_) t.detach();
}

bool DeferredJoins::join_or_defer(std::thread& t) {
  if (!t.joinable()) return true;
  if (t.get_id() != std::this_thread::get_id()) {
    t.join();
    return true;
  }
  GST_WARNING("stopped from one of its own threads (a state change in a probe or a sync bus handler): that thread "
              "ends when the handler returns");
  std::lock_guard<std::mutex> lock(mutex_);
  kept_.push_back(std::move(t));
  return false;
}

void DeferredJoins::join_others() {
  std::vector<std::thread> joinable;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::thread> keep;
    for (std::thread& t : kept_) (t.get_id() == std::this_thread::get_id() ? keep : joinable).push_back(std::move(t));
    kept_ = std::move(keep);
  }
  for (std::thread& t : joinable)
    if (t.joinable()) t.join();
}

/* ----------------------------------------------------------- BatchWorker */

void BatchWorker::PushItem::drop() {
  for (GstBuffer* b : outputs) gst_buffer_unref(b);
  outputs.clear();
  if (event) gst_event_unref(event);
  event = nullptr;
}

BatchWorker::BatchWorker(Callbacks callbacks, DeferredJoins& joins) : cb_(std::move(callbacks)), joins_(joins) {
  init_debug();
}

BatchWorker::~BatchWorker() { stop(); }

size_t BatchWorker::waiting_jobs() const {
  return std::count_if(queue_.begin(), queue_.end(), [](const WorkItem& i) { return i.job != nullptr; });
}

size_t BatchWorker::waiting_outputs() const {
  return std::count_if(out_.begin(), out_.end(), [](const PushItem& i) { return !i.event; });
}

void BatchWorker::drop_queues() {
  for (WorkItem& item : queue_) {
    if (item.job) inputs_in_flight_ -= std::min<guint64>(item.job->inputs(), inputs_in_flight_);
    if (item.event) gst_event_unref(item.event);
  }
  queue_.clear();
  for (PushItem& item : out_) {
    inputs_in_flight_ -= std::min<guint64>(item.inputs, inputs_in_flight_);
    item.drop();
  }
  out_.clear();
}

void BatchWorker::start() {
  if (running()) stop();
  joins_.join_others();  // before quit is cleared: they must see it to end
  std::lock_guard<std::mutex> lock(mutex_);
  quit_ = false;
  flushing_ = false;
  flow_ = GST_FLOW_OK;
  generation_++;
  inputs_in_flight_ = 0;
  work_thread_ = std::thread(&BatchWorker::work_loop, this);
  push_thread_ = std::thread(&BatchWorker::push_loop, this);
}

void BatchWorker::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    quit_ = true;
    flushing_ = true;
    drop_queues();
    cond_.notify_all();
  }
  joins_.join_or_defer(work_thread_);
  joins_.join_or_defer(push_thread_);
  std::lock_guard<std::mutex> lock(mutex_);
  drop_queues();
  inputs_in_flight_ = 0;
}

GstFlowReturn BatchWorker::submit(std::unique_ptr<BatchJob> job) {
  const size_t n = job->inputs();
  std::unique_lock<std::mutex> lock(mutex_);
  cond_.wait(lock, [&] { return waiting_jobs() < kMaxWaitingJobs || flushing_; });
  if (flushing_) {
    GST_DEBUG("flushing: dropping a batch of %zu inputs", n);
    return GST_FLOW_FLUSHING;
  }
  if (failed()) {
    GST_DEBUG("%s before: dropping a batch of %zu inputs", gst_flow_get_name(flow_), n);
    return flow_;
  }
  WorkItem item;
  item.job = std::move(job);
  item.generation = generation_;
  inputs_in_flight_ += n;
  queue_.push_back(std::move(item));
  cond_.notify_all();
  const GstFlowReturn flow = flow_;
  if (flow > GST_FLOW_NOT_NEGOTIATED) flow_ = GST_FLOW_OK;
  return flow;
}

bool BatchWorker::queue_event(GstEvent* event) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (idle() || flushing_) return false;
  WorkItem item;
  item.event = event;
  item.generation = generation_;
  queue_.push_back(std::move(item));
  cond_.notify_all();
  return true;
}

GstFlowReturn BatchWorker::wait_idle() {
  std::unique_lock<std::mutex> lock(mutex_);
  cond_.wait(lock, [&] { return idle() || flushing_; });
  return flushing_ ? GST_FLOW_FLUSHING : flow_;
}

GstFlowReturn BatchWorker::take_flow() {
  std::lock_guard<std::mutex> lock(mutex_);
  const GstFlowReturn flow = flow_;
  if (flow > GST_FLOW_NOT_NEGOTIATED) flow_ = GST_FLOW_OK;
  return flow;
}

void BatchWorker::flush_start() {
  std::lock_guard<std::mutex> lock(mutex_);
  GST_DEBUG("flush start: dropping %zu queued items", queue_.size());
  flushing_ = true;
  drop_queues();
  cond_.notify_all();
}

void BatchWorker::flush_stop() {
  // The src pad is still flushing here, so a push in progress returns at
  // once; after this, outputs of jobs from before the flush are stale.
  std::lock_guard<std::recursive_mutex> fence(push_mutex_);
  std::lock_guard<std::mutex> lock(mutex_);
  drop_queues();
  generation_++;
  flushing_ = false;
  flow_ = GST_FLOW_OK;
}

void BatchWorker::set_flushing() {
  std::lock_guard<std::mutex> lock(mutex_);
  flushing_ = true;
  cond_.notify_all();
}

guint64 BatchWorker::inputs_in_flight() {
  std::lock_guard<std::mutex> lock(mutex_);
  return inputs_in_flight_;
}

bool BatchWorker::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return !idle();
}

void BatchWorker::work_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cond_.wait(lock, [&] { return quit_ || !queue_.empty(); });
    if (quit_) break;
    WorkItem item = std::move(queue_.front());
    queue_.pop_front();
    if (item.event) {
      // In order behind the outputs queued before it; events are not bounded.
      PushItem out;
      out.event = item.event;
      out.generation = item.generation;
      out_.push_back(std::move(out));
      cond_.notify_all();
      continue;
    }
    working_ = true;
    cond_.notify_all();  // a slot is free for the next job
    lock.unlock();

    PushItem out;
    out.inputs = item.job->inputs();
    out.generation = item.generation;
    std::string error;
    const auto start = std::chrono::steady_clock::now();
    try {
      out.outputs = item.job->run();
      out.ready_wait = item.job->take_ready_wait();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const GstClockTime elapsed =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    bool ok = error.empty();
    if (!ok) {
      lock.lock();
      const bool flushed = flushing_ || item.generation != generation_;
      if (!flushed && flow_ == GST_FLOW_OK) flow_ = GST_FLOW_ERROR;
      lock.unlock();
      // Inputs the application flushed away: no reason to stop the new stream.
      if (flushed && cb_.failed_flushed)
        cb_.failed_flushed(error);
      else if (!flushed && cb_.failed)
        cb_.failed(error);
    } else if (cb_.done) {
      cb_.done(*item.job, out.outputs.size(), elapsed);
    }
    item.job.reset();  // staging memory goes back to its owner now

    lock.lock();
    // Wait for room behind the outputs being pushed; downstream holds them
    // for as long as it likes (a syncing sink, a prerolled one), the model
    // does not wait for more than that one job.
    cond_.wait(lock, [&] { return waiting_outputs() < kMaxWaitingOutputs || flushing_ || quit_; });
    if (!ok || flushing_ || quit_ || out.generation != generation_) {
      inputs_in_flight_ -= std::min<guint64>(out.inputs, inputs_in_flight_);
      out.drop();
    } else {
      out_.push_back(std::move(out));
    }
    working_ = false;
    cond_.notify_all();
  }
}

void BatchWorker::push_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cond_.wait(lock, [&] { return quit_ || !out_.empty(); });
    if (quit_) break;
    PushItem item = std::move(out_.front());
    out_.pop_front();
    const size_t n = item.inputs;  // 0 for an event
    pushing_ = true;
    cond_.notify_all();  // room for the next finished job
    lock.unlock();
    if (item.ready_wait) wait_ready(item);
    push_item(item);
    lock.lock();
    pushing_ = false;
    inputs_in_flight_ -= std::min<guint64>(n, inputs_in_flight_);  // 0 already if stopped meanwhile
    cond_.notify_all();
  }
}

// The outputs' contents are still being written (a download overlapped with
// the next job): wait for them. If that fails, the job failed: its outputs are
// dropped and the failure reported as run() failing would be.
void BatchWorker::wait_ready(PushItem& item) {
  std::string error;
  try {
    item.ready_wait();
  } catch (const std::exception& e) {
    error = e.what();
  }
  item.ready_wait = nullptr;
  if (error.empty()) return;
  std::unique_lock<std::mutex> lock(mutex_);
  const bool flushed = flushing_ || item.generation != generation_;
  if (!flushed && flow_ == GST_FLOW_OK) flow_ = GST_FLOW_ERROR;
  lock.unlock();
  for (GstBuffer* b : item.outputs) gst_buffer_unref(b);
  item.outputs.clear();
  if (flushed && cb_.failed_flushed)
    cb_.failed_flushed(error);
  else if (!flushed && cb_.failed)
    cb_.failed(error);
}

// Pushes a job's outputs (or an event) unless a flush came after the job was
// handed over, or (for outputs) an error came first: downstream would see
// outputs after a hole.
void BatchWorker::push_item(PushItem& item) {
  std::lock_guard<std::recursive_mutex> fence(push_mutex_);
  auto is_stale = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    return flushing_ || item.generation != generation_ || (!item.event && failed());
  };
  if (item.event) {
    GstEvent* event = item.event;
    item.event = nullptr;
    if (is_stale())
      gst_event_unref(event);
    else
      cb_.push_event(event);
    return;
  }
  bool stale = false;
  GstFlowReturn ret = GST_FLOW_OK;
  for (GstBuffer* b : item.outputs) {
    if (ret == GST_FLOW_OK && !stale && is_stale()) {
      stale = true;
      GST_DEBUG("flushed or failed: dropping outputs of a job from before");
    }
    if (ret == GST_FLOW_OK && !stale)
      ret = cb_.push(b);
    else
      gst_buffer_unref(b);
  }
  item.outputs.clear();
  if (ret != GST_FLOW_OK && !stale) {
    GST_DEBUG("pushing: %s", gst_flow_get_name(ret));
    std::lock_guard<std::mutex> lock(mutex_);
    if (flow_ == GST_FLOW_OK) flow_ = ret;
  }
}

/* ------------------------------------------------------------ BatchTimer */

BatchTimer::~BatchTimer() {
  stop();
  if (clock_) gst_object_unref(clock_);
}

void BatchTimer::start(std::function<void()> expired, ClockSource clock) {
  if (thread_.joinable()) stop();
  joins_.join_others();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    quit_ = false;
    armed_ = false;
    expired_ = std::move(expired);
    clock_source_ = std::move(clock);
  }
  thread_ = std::thread(&BatchTimer::loop, this);
}

void BatchTimer::cancel_wait() {
  arms_++;
  if (waiting_) gst_clock_id_unschedule(waiting_);
  cond_.notify_all();
}

void BatchTimer::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    quit_ = true;
    cancel_wait();
  }
  // quit_ stays set: a deferred timer thread must see it to end; start()
  // clears it once every old thread has been joined.
  joins_.join_or_defer(thread_);
}

GstClockTime BatchTimer::now(GstClock** clock) {
  ClockSource source;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    source = clock_source_;
  }
  GstClock* c = source ? source() : gst_system_clock_obtain();
  *clock = c;
  return gst_clock_get_time(c);
}

void BatchTimer::arm(GstClock* clock, GstClockTime deadline) {
  std::lock_guard<std::mutex> lock(mutex_);
  gst_object_replace(reinterpret_cast<GstObject**>(&clock_), GST_OBJECT(clock));
  deadline_ = deadline;
  armed_ = true;
  cancel_wait();
}

void BatchTimer::arm_now() {
  GstClock* clock = nullptr;
  const GstClockTime t = now(&clock);
  arm(clock, t);
  gst_object_unref(clock);
}

void BatchTimer::disarm() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = false;
  cancel_wait();
}

bool BatchTimer::stopping() {
  std::lock_guard<std::mutex> lock(mutex_);
  return quit_;
}

void BatchTimer::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!quit_) {
    if (!armed_) {
      cond_.wait(lock);
      continue;
    }
    const guint64 arms = arms_;
    GstClockID id = gst_clock_new_single_shot_id(clock_, deadline_);
    waiting_ = id;
    lock.unlock();
    // An arm, disarm or stop meanwhile unschedules it: the wait returns at once.
    const GstClockReturn r = gst_clock_id_wait(id, nullptr);
    lock.lock();
    waiting_ = nullptr;
    gst_clock_id_unref(id);
    if (quit_ || !armed_ || arms != arms_ || (r != GST_CLOCK_OK && r != GST_CLOCK_EARLY)) continue;
    armed_ = false;
    std::function<void()> expired = expired_;
    lock.unlock();
    expired();
    lock.lock();
  }
}

}  // namespace gstvae_glue
