/* jaxcnn's XLA FFI handlers for its oneDNN calls, compiled (the `jaxcnn._native` library), and
   its one-pass AdamW (at the end of this file; jaxcnn.train.fused).

jaxcnn.dnnl, jaxcnn.bnorm and jaxcnn.pool build their oneDNN primitives in Python (ctypes) and
first ran them from handlers written in Python too. Those took the GIL on every call (~120-170
us each, 179 calls in a densenet_bc_100_12 training step), and ran Python inside XLA's
computations: an interpreter torn down with a step in flight left XLA's client waiting forever
(session 22).
Here each call runs without Python: the handler computes the call's key from its buffers (what
jaxcnn.native.program_key computes from the same frame), finds the program Python built for that
key, points the program's oneDNN memories at XLA's buffers and executes its primitives. Only the
first call of a key calls back into Python, to build its program (`jaxcnn_init`'s `build`).

A program: `npar` sequences that may run side by side (a weight gradient split by batch: each
chunk single-threaded, offered to XLA's thread pool, the calling thread runs every chunk no idle
pool thread has claimed), then one serial sequence on the calling thread. A sequence is a list of
ops: point a oneDNN memory at an operand or result buffer (+ a byte offset), or execute a
primitive (then wait for its stream). Programs are never freed: they live as long as the
process, like the primitives they run.

The oneDNN and OpenMP functions come as addresses from Python (from the libdnnl it loaded), so
this file links against neither. XLA's FFI structs are from XLA's own header (vendored, see
xla_ffi_c_api.h).
*/
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xla_ffi_c_api.h"

#define EXPORT __attribute__((visibility("default")))

typedef int (*set_handle_fn)(void *memory, void *handle);                        /* dnnl_memory_set_data_handle */
typedef int (*execute_fn)(void *primitive, void *stream, int nargs, const void *args); /* dnnl_primitive_execute */
typedef int (*wait_fn)(void *stream);                                            /* dnnl_stream_wait */
typedef int (*stream_create_fn)(void **stream, void *engine, unsigned flags);    /* dnnl_stream_create */
typedef void (*omp_set_fn)(int);
typedef int (*omp_get_fn)(void);
/* Python's builder: makes and publishes the program for `key` from this call's frame; 0 on
   success, else an error message in `error`. */
typedef int (*build_fn)(void *frame, int target, const int64_t *key, int64_t key_len, char *error,
                        int64_t error_len);

static struct {
  set_handle_fn set_handle;
  execute_fn execute;
  wait_fn wait;
  stream_create_fn stream_create;
  void *engine;
  omp_set_fn omp_set; /* NULL: not an OpenMP build of oneDNN */
  omp_get_fn omp_get;
  build_fn build;
} dnnl;

enum { OP_SET = 0, OP_EXEC = 1, OP_NANS = 2 };
enum { FROM_ARG = 0, FROM_RET = 1 };

typedef struct {
  int kind;
  void *object; /* a dnnl_memory_t (OP_SET) or a dnnl_primitive_t (OP_EXEC) */
  int from, index; /* OP_SET, OP_NANS: the operand (FROM_ARG) or result (FROM_RET) buffer */
  int64_t offset;  /* OP_SET: bytes into that buffer; OP_NANS: its element count */
  int nargs;       /* OP_EXEC: the primitive's dnnl_exec_arg_t array; OP_NANS: bytes per element */
  const void *args;
} Op;

typedef struct {
  int n, cap;
  Op *ops;
} Seq;

typedef struct Program {
  int64_t *key;
  int64_t key_len;
  uint64_t hash;
  int single_thread; /* run every sequence with OpenMP at 1 thread (chunks of a split call) */
  int global;        /* hold the global lock: the call runs on oneDNN's OpenMP threads, all cores */
  int nlocks;
  pthread_mutex_t **locks; /* the plans' own locks, taken in order: their memories are shared */
  int npar;
  Seq *par;
  Seq serial;
  struct Program *next;
} Program;

#define BUCKETS 1024
static _Atomic(Program *) table[BUCKETS];
static pthread_mutex_t publish_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t global_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread void *thread_stream; /* a oneDNN stream per thread: chunks run on several */

static uint64_t hash_key(const int64_t *key, int64_t n) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a over the words */
  for (int64_t i = 0; i < n; i++) {
    h ^= (uint64_t)key[i];
    h *= 1099511628211ull;
  }
  return h;
}

static Program *find(const int64_t *key, int64_t n, uint64_t h) {
  for (Program *p = atomic_load(&table[h % BUCKETS]); p; p = p->next)
    if (p->hash == h && p->key_len == n && memcmp(p->key, key, n * sizeof(int64_t)) == 0) return p;
  return NULL;
}

/* ---- building programs (from Python, under its own lock) ---- */

EXPORT void jaxcnn_init(void *set_handle, void *execute, void *wait, void *stream_create, void *engine,
                        void *omp_set, void *omp_get, void *build) {
  dnnl.set_handle = (set_handle_fn)set_handle;
  dnnl.execute = (execute_fn)execute;
  dnnl.wait = (wait_fn)wait;
  dnnl.stream_create = (stream_create_fn)stream_create;
  dnnl.engine = engine;
  dnnl.omp_set = (omp_set_fn)omp_set;
  dnnl.omp_get = (omp_get_fn)omp_get;
  dnnl.build = (build_fn)build;
}

EXPORT void *jaxcnn_mutex_new(void) {
  pthread_mutex_t *m = malloc(sizeof *m);
  if (m) pthread_mutex_init(m, NULL);
  return m;
}

EXPORT void *jaxcnn_program_new(const int64_t *key, int64_t key_len, int npar, int single_thread, int global) {
  Program *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->key = malloc(key_len * sizeof(int64_t));
  p->par = calloc(npar > 0 ? npar : 1, sizeof(Seq));
  if (!p->key || !p->par) return NULL;
  memcpy(p->key, key, key_len * sizeof(int64_t));
  p->key_len = key_len;
  p->hash = hash_key(key, key_len);
  p->npar = npar;
  p->single_thread = single_thread;
  p->global = global;
  return p;
}

EXPORT int jaxcnn_program_lock(Program *p, pthread_mutex_t *m) {
  pthread_mutex_t **locks = realloc(p->locks, (p->nlocks + 1) * sizeof *locks);
  if (!locks) return -1;
  p->locks = locks;
  p->locks[p->nlocks++] = m;
  return 0;
}

static int push(Program *p, int seq, Op op) {
  if (seq >= p->npar) return -1;
  Seq *s = seq < 0 ? &p->serial : &p->par[seq];
  if (s->n == s->cap) {
    int cap = s->cap ? 2 * s->cap : 8;
    Op *ops = realloc(s->ops, cap * sizeof *ops);
    if (!ops) return -1;
    s->ops = ops;
    s->cap = cap;
  }
  s->ops[s->n++] = op;
  return 0;
}

/* seq: -1 the serial sequence, else the parallel sequence `seq`. */
EXPORT int jaxcnn_program_set(Program *p, int seq, void *memory, int from, int index, int64_t offset) {
  Op op = {OP_SET, memory, from, index, offset, 0, NULL};
  return push(p, seq, op);
}

EXPORT int jaxcnn_program_exec(Program *p, int seq, void *primitive, int nargs, const void *args) {
  Op op = {OP_EXEC, primitive, 0, 0, 0, nargs, args};
  return push(p, seq, op);
}

/* Set back to NaN the elements a oneDNN max-pool wrote for windows of NaNs (see jaxcnn/pool.py). */
EXPORT int jaxcnn_program_nans(Program *p, int seq, int from, int index, int64_t count, int bytes) {
  Op op = {OP_NANS, NULL, from, index, count, bytes, NULL};
  return push(p, seq, op);
}

EXPORT void jaxcnn_program_publish(Program *p) {
  pthread_mutex_lock(&publish_lock);
  if (!find(p->key, p->key_len, p->hash)) { /* a second build of the same key is dropped */
    _Atomic(Program *) *bucket = &table[p->hash % BUCKETS];
    p->next = atomic_load(bucket);
    atomic_store(bucket, p);
  }
  pthread_mutex_unlock(&publish_lock);
}

/* ---- running them ---- */

static XLA_FFI_Error *error(const XLA_FFI_Api *api, const char *message) {
  XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL, message,
                                    XLA_FFI_Error_Code_INTERNAL};
  return api->XLA_FFI_Error_Create(&args);
}

static void *buffer(XLA_FFI_CallFrame *f, int from, int index) {
  void **items = from == FROM_ARG ? f->args.args : f->rets.rets;
  int64_t size = from == FROM_ARG ? f->args.size : f->rets.size;
  return index < size ? ((XLA_FFI_Buffer *)items[index])->data : NULL;
}

/* oneDNN's max-pool compares with an ordered `<` from the lowest value: a window of NaNs comes
   out as float32's lowest finite value (bf16: -inf). Those become NaN again. */
static void restore_nans(void *data, int64_t count, int bytes) {
  if (bytes == 2) {
    uint16_t *v = data;
    for (int64_t i = 0; i < count; i++) v[i] = v[i] == 0xFF80u ? 0x7FC0u : v[i];
  } else {
    uint32_t *v = data;
    for (int64_t i = 0; i < count; i++) v[i] = v[i] == 0xFF7FFFFFu ? 0x7FC00000u : v[i];
  }
}

/* 0, or the failing oneDNN status (> 0), or -1 for an operand that is not there. */
static int run_seq(XLA_FFI_CallFrame *f, const Seq *s, int single_thread) {
  int before = 0, status = 0;
  if (!thread_stream && (status = dnnl.stream_create(&thread_stream, dnnl.engine, 1 /* in order */)))
    return status;
  if (single_thread && dnnl.omp_set) {
    before = dnnl.omp_get();
    dnnl.omp_set(1);
  }
  for (int i = 0; i < s->n && !status; i++) {
    const Op *op = &s->ops[i];
    if (op->kind == OP_SET) {
      char *base = buffer(f, op->from, op->index);
      status = base ? dnnl.set_handle(op->object, base + op->offset) : -1;
    } else if (op->kind == OP_NANS) {
      void *base = buffer(f, op->from, op->index);
      if (base) restore_nans(base, op->offset, op->nargs);
      else status = -1;
    } else if (!(status = dnnl.execute(op->object, thread_stream, op->nargs, op->args))) {
      status = dnnl.wait(thread_stream);
    }
  }
  if (single_thread && dnnl.omp_set) dnnl.omp_set(before);
  return status;
}

/* `n` tasks, run(ctx, i) for i in [0, n), claimed through a counter by the calling thread and
   by up to `helpers` tasks offered to XLA's thread pool; returns once all n have run, -2 if out of
   memory (then none ran). Heap-allocated and counted: a pool task may start after the call has
   returned; it then finds nothing left to claim and touches neither `ctx` nor the call's buffers.
   Used by the split oneDNN calls (run_parallel) and by AdamW (jaxcnn_adamw). */
typedef void (*task_fn)(void *ctx, int i);

typedef struct {
  atomic_int refs, next, left;
  int n;
  task_fn run;
  void *ctx;
  pthread_mutex_t lock;
  pthread_cond_t done;
} Fanout;

static void fanout_release(Fanout *job) {
  if (atomic_fetch_sub(&job->refs, 1) == 1) {
    pthread_mutex_destroy(&job->lock);
    pthread_cond_destroy(&job->done);
    free(job);
  }
}

static void fanout_work(Fanout *job) {
  for (int i; (i = atomic_fetch_add(&job->next, 1)) < job->n;) {
    job->run(job->ctx, i);
    if (atomic_fetch_sub(&job->left, 1) == 1) {
      pthread_mutex_lock(&job->lock);
      pthread_cond_broadcast(&job->done);
      pthread_mutex_unlock(&job->lock);
    }
  }
}

static void fanout_task(void *data) {
  fanout_work(data);
  fanout_release(data);
}

static int parallel_for(XLA_FFI_CallFrame *f, int n, int64_t helpers, task_fn run, void *ctx) {
  Fanout *job = calloc(1, sizeof *job);
  if (!job) return -2;
  job->n = n;
  job->run = run;
  job->ctx = ctx;
  atomic_init(&job->refs, 1);
  atomic_init(&job->next, 0);
  atomic_init(&job->left, n);
  pthread_mutex_init(&job->lock, NULL);
  pthread_cond_init(&job->done, NULL);
  if (helpers > n - 1) helpers = n - 1;
  for (int64_t i = 0; i < helpers; i++) { /* if XLA refuses a task, this thread does its share */
    atomic_fetch_add(&job->refs, 1);
    XLA_FFI_ThreadPool_Schedule_Args args = {XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE, NULL, f->ctx,
                                             fanout_task, job};
    XLA_FFI_Error *err = f->api->XLA_FFI_ThreadPool_Schedule(&args);
    if (err) {
      XLA_FFI_Error_Destroy_Args d = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
      f->api->XLA_FFI_Error_Destroy(&d);
      atomic_fetch_sub(&job->refs, 1);
      break;
    }
  }
  fanout_work(job);
  pthread_mutex_lock(&job->lock);
  while (atomic_load(&job->left) > 0) pthread_cond_wait(&job->done, &job->lock);
  pthread_mutex_unlock(&job->lock);
  fanout_release(job);
  return 0;
}

/* The sequences of one split call, side by side (each on one OpenMP thread if single_thread). */
typedef struct {
  XLA_FFI_CallFrame *frame;
  Program *p;
  atomic_int status;
} Split;

static void run_split(void *ctx, int i) {
  Split *s = ctx;
  int status = run_seq(s->frame, &s->p->par[i], s->p->single_thread);
  if (status) atomic_store(&s->status, status);
}

static int run_parallel(XLA_FFI_CallFrame *f, Program *p) {
  Split s = {f, p};
  atomic_init(&s.status, 0);
  int status = parallel_for(f, p->npar, p->npar - 1, run_split, &s);
  return status ? status : atomic_load(&s.status);
}

/* XLA's thread pool size for this call (0: none). */
static int64_t pool_threads(XLA_FFI_CallFrame *f) {
  int64_t n = 0;
  XLA_FFI_ThreadPool_NumThreads_Args args = {XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE, NULL, f->ctx, &n};
  XLA_FFI_Error *err = f->api->XLA_FFI_ThreadPool_NumThreads(&args);
  if (err) {
    XLA_FFI_Error_Destroy_Args d = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
    f->api->XLA_FFI_Error_Destroy(&d);
    return 0;
  }
  return n;
}

#define MAX_KEY 256

/* The key of a call: target, XLA's pool threads, every operand and result (dtype, rank, dims),
   then the values of the last operand (the int32 geometry or config every jaxcnn call ends with).
   jaxcnn.native.program_key computes the same from Python. */
static int64_t call_key(XLA_FFI_CallFrame *f, int target, int64_t *key) {
  int64_t n = 0;
  key[n++] = target;
  key[n++] = pool_threads(f);
  for (int from = 0; from < 2; from++) {
    int64_t size = from == FROM_ARG ? f->args.size : f->rets.size;
    void **items = from == FROM_ARG ? f->args.args : f->rets.rets;
    key[n++] = size;
    for (int64_t i = 0; i < size; i++) {
      XLA_FFI_Buffer *b = items[i];
      if (n + 2 + b->rank > MAX_KEY - 16) return -1;
      key[n++] = b->dtype;
      key[n++] = b->rank;
      for (int64_t d = 0; d < b->rank; d++) key[n++] = b->dims[d];
    }
  }
  XLA_FFI_Buffer *last = f->args.args[f->args.size - 1];
  int64_t count = 1;
  for (int64_t d = 0; d < last->rank; d++) count *= last->dims[d];
  if (last->dtype != XLA_FFI_DataType_S32 || n + count > MAX_KEY) return -1;
  for (int64_t i = 0; i < count; i++) key[n++] = ((int32_t *)last->data)[i];
  return n;
}

/* By target id, as jaxcnn.native.TARGETS. */
static const char *NAMES[] = {"weight gradient", "batch norm", "batch norm gradient", "max-pool",
                               "max-pool gradient"};

/* 1 where this call is not one to execute: XLA asking for the handler's metadata (answered here)
   or a stage before execution. */
static int not_executing(XLA_FFI_CallFrame *f) {
  if (f->extension_start) {
    if (f->extension_start->type == XLA_FFI_Extension_Metadata) {
      XLA_FFI_Metadata *meta = ((XLA_FFI_Metadata_Extension *)f->extension_start)->metadata;
      meta->api_version.major_version = 0; /* the oldest FFI API with everything used here */
      meta->api_version.minor_version = 1;
      meta->traits = 0;
    }
    return 1;
  }
  return f->stage != XLA_FFI_ExecutionStage_EXECUTE;
}

static XLA_FFI_Error *handle(XLA_FFI_CallFrame *f, int target) {
  if (not_executing(f)) return NULL;
  char message[2048];
  int64_t key[MAX_KEY];
  int64_t n = f->args.size > 0 ? call_key(f, target, key) : -1;
  if (n < 0) {
    snprintf(message, sizeof message, "jaxcnn oneDNN %s: a call jaxcnn does not make", NAMES[target]);
    return error(f->api, message);
  }
  uint64_t h = hash_key(key, n);
  Program *p = find(key, n, h);
  if (!p) { /* first call of this key: Python builds its program (takes the GIL) */
    message[0] = 0;
    if (!dnnl.build || dnnl.build(f, target, key, n, message, sizeof message) || !(p = find(key, n, h))) {
      char full[2200];
      snprintf(full, sizeof full, "jaxcnn oneDNN %s: %s", NAMES[target], message[0] ? message : "no program");
      return error(f->api, full);
    }
  }
  if (p->global) pthread_mutex_lock(&global_lock);
  for (int i = 0; i < p->nlocks; i++) pthread_mutex_lock(p->locks[i]);
  int status = p->npar > 0 ? run_parallel(f, p) : 0;
  if (!status) status = run_seq(f, &p->serial, p->single_thread);
  for (int i = p->nlocks - 1; i >= 0; i--) pthread_mutex_unlock(p->locks[i]);
  if (p->global) pthread_mutex_unlock(&global_lock);
  if (status) {
    snprintf(message, sizeof message, "jaxcnn oneDNN %s: %s (status %d)", NAMES[target],
             status == -1 ? "an operand is missing" : status == -2 ? "out of memory" : "oneDNN call failed",
             status);
    return error(f->api, message);
  }
  return NULL;
}

/* One handler per target id; a target without its name in NAMES does not compile (a missing
   name was read past the array's end when that target's call failed). */
#define HANDLER(name, id)                                                                     \
  EXPORT XLA_FFI_Error *jaxcnn_##name(XLA_FFI_CallFrame *f) {                                 \
    _Static_assert((id) < sizeof NAMES / sizeof *NAMES, "name target " #name " in NAMES");  \
    return handle(f, (id));                                                                   \
  }
HANDLER(weight_grad, 0)
HANDLER(bn_forward, 1)
HANDLER(bn_backward, 2)
HANDLER(pool_forward, 3)
HANDLER(pool_backward, 4)

/* ---- AdamW in one pass (jaxcnn.train.fused; no oneDNN) ----

XLA computes AdamW per parameter in one loop fusion, but the step's three metrics (the norms of
the gradient, of the new parameters and of the update) split it: the update has to be
materialised for its norm, and the gradient's square is shared with the second moment's. That
cost 28 ms a step for resnet18_cifar's 11.2M parameters on the 2-core Xeon, more than the update
itself (12 ms), and every simulated device pays it. Here one pass reads p, g, m, v, writes p, m,
v in place and sums g^2, p^2 and u^2 on the way.

Operands: p, g, m, v (float32, same size), h (float32[12]: gradient scale, b1, 1 - b1, b2, 1 - b2,
eps, eps_root, 1 / (1 - b1^t), 1 / (1 - b2^t), weight decay, -lr * lr_scale; see
jaxcnn.train.fused), and a value the update does not use (it orders the calls). 1 - b1 and 1 - b2 come rounded from double, as optax's Python floats do:
computed here in float32 from b2 = 0.999 they were 1.3e-5 off.
Results: p, m, v (aliased with the operands), sums float32[3]. The arithmetic is optax's adamw in
its order, except the bias corrections multiply by reciprocals (within 1 ulp of optax's
division). */

enum { H_GSCALE, H_B1, H_1B1, H_B2, H_1B2, H_EPS, H_EPS_ROOT, H_C1, H_C2, H_WD, H_STEP, H_AFTER, H_COUNT }; /* H_AFTER: unused (jaxcnn.train.fused orders the calls by it) */
#define ADAM_CHUNK (1 << 16) /* elements per task: 256 KB of each array */
#define LANES 16

typedef struct {
  const float *p, *g, *m, *v;
  float *po, *mo, *vo;
  float h[H_COUNT];
  int64_t n;
} Adam;

__attribute__((target_clones("avx512f", "avx2", "default")))
static void adam_range(const Adam *a, int64_t lo, int64_t hi, double *sums) {
  const float gs = a->h[H_GSCALE], b1 = a->h[H_B1], b2 = a->h[H_B2], d1 = a->h[H_1B1], d2 = a->h[H_1B2], eps = a->h[H_EPS],
              eps_root = a->h[H_EPS_ROOT], c1 = a->h[H_C1], c2 = a->h[H_C2], wd = a->h[H_WD],
              step = a->h[H_STEP];
  float sg[LANES] = {0}, sp[LANES] = {0}, su[LANES] = {0};
  int64_t i = lo;
  for (; i + LANES <= hi; i += LANES) {
    /* Loads, arithmetic and stores in separate lane loops: the results may be the operands'
       own buffers (aliased), and this way each loop is one vector operation per lane group. */
    float P[LANES], G[LANES], M[LANES], V[LANES];
    for (int j = 0; j < LANES; j++) {
      P[j] = a->p[i + j];
      G[j] = a->g[i + j];
      M[j] = a->m[i + j];
      V[j] = a->v[i + j];
    }
    for (int j = 0; j < LANES; j++) {
      float g = gs == 0.0f ? 0.0f : G[j] * gs; /* a frozen parameter's gradient is 0 (optax: zeros_like) */
      float m = d1 * g + b1 * M[j];
      float v = d2 * (g * g) + b2 * V[j];
      float u = (m * c1) / (__builtin_sqrtf(v * c2 + eps_root) + eps);
      u = (u + wd * P[j]) * step;
      sg[j] += G[j] * G[j];
      M[j] = m;
      V[j] = v;
      P[j] += u;
      sp[j] += P[j] * P[j];
      su[j] += u * u;
    }
    for (int j = 0; j < LANES; j++) {
      a->po[i + j] = P[j];
      a->mo[i + j] = M[j];
      a->vo[i + j] = V[j];
    }
  }
  double tg = 0, tp = 0, tu = 0;
  for (; i < hi; i++) {
    float graw = a->g[i];
    float g = gs == 0.0f ? 0.0f : graw * gs;
    float m = d1 * g + b1 * a->m[i];
    float v = d2 * (g * g) + b2 * a->v[i];
    float u = (m * c1) / (__builtin_sqrtf(v * c2 + eps_root) + eps);
    u = (u + wd * a->p[i]) * step;
    float p = a->p[i] + u;
    a->mo[i] = m;
    a->vo[i] = v;
    a->po[i] = p;
    tg += (double)graw * graw;
    tp += (double)p * p;
    tu += (double)u * u;
  }
  for (int j = 0; j < LANES; j++) {
    tg += sg[j];
    tp += sp[j];
    tu += su[j];
  }
  sums[0] = tg;
  sums[1] = tp;
  sums[2] = tu;
}

/* One call's chunks (ADAM_CHUNK elements each): each writes its own sums, added in chunk order
   at the end, so the result does not depend on which thread ran what. */
typedef struct {
  Adam a;
  double *sums;
} AdamCall;

static void adam_chunk(void *ctx, int i) {
  AdamCall *c = ctx;
  int64_t lo = (int64_t)i * ADAM_CHUNK, hi = lo + ADAM_CHUNK < c->a.n ? lo + ADAM_CHUNK : c->a.n;
  adam_range(&c->a, lo, hi, &c->sums[3 * i]);
}

static int64_t elements(const XLA_FFI_Buffer *b) {
  int64_t n = 1;
  for (int64_t d = 0; d < b->rank; d++) n *= b->dims[d];
  return n;
}

EXPORT XLA_FFI_Error *jaxcnn_adamw(XLA_FFI_CallFrame *f) {
  if (not_executing(f)) return NULL;
  if (f->args.size != 5 || f->rets.size != 4) return error(f->api, "jaxcnn AdamW: a call jaxcnn does not make");
  XLA_FFI_Buffer **in = (XLA_FFI_Buffer **)f->args.args, **out = (XLA_FFI_Buffer **)f->rets.rets;
  int64_t n = elements(in[0]);
  for (int i = 0; i < 5; i++)
    if (in[i]->dtype != XLA_FFI_DataType_F32 || (i < 4 && elements(in[i]) != n) || (i == 4 && elements(in[i]) < H_COUNT))
      return error(f->api, "jaxcnn AdamW: operands must be float32 p, g, m, v of one size and the hyperparameters");
  for (int i = 0; i < 4; i++)
    if (out[i]->dtype != XLA_FFI_DataType_F32 || elements(out[i]) != (i < 3 ? n : 3))
      return error(f->api, "jaxcnn AdamW: results must be float32 p, m, v and 3 sums");
  int chunks = (int)((n + ADAM_CHUNK - 1) / ADAM_CHUNK);
  AdamCall call = {{in[0]->data, in[1]->data, in[2]->data, in[3]->data, out[0]->data, out[1]->data, out[2]->data, {0}, n},
                   calloc(chunks > 0 ? 3 * chunks : 3, sizeof(double))};
  memcpy(call.a.h, in[4]->data, sizeof call.a.h);
  if (!call.sums || parallel_for(f, chunks, pool_threads(f), adam_chunk, &call)) {
    free(call.sums);
    return error(f->api, "jaxcnn AdamW: out of memory");
  }
  double t[3] = {0, 0, 0};
  for (int i = 0; i < chunks; i++)
    for (int k = 0; k < 3; k++) t[k] += call.sums[3 * i + k];
  float *sums = out[3]->data;
  for (int k = 0; k < 3; k++) sums[k] = (float)t[k];
  free(call.sums);
  return NULL;
}
