// xbai_kernels._C: the Python face of the C interface in sprm_head_launch.h.
//
// Written against CPython's stable ABI (Py_LIMITED_API = 3.10) rather than pybind11: pybind11
// cannot build a stable-ABI module, and the stable ABI is what lets one built file (_C.abi3.so)
// import under every CPython >= 3.10. Nothing here knows torch: tensors arrive as data pointers
// (Python ints), so the file also survives every torch release.
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "sprm_head_launch.h"

namespace {

PyObject* raise_status(int32_t status) {
  PyErr_Format(status > 0 ? PyExc_RuntimeError : PyExc_ValueError, "xbai_kernels._C: %s (status %d)",
               xbai_status_string(status), static_cast<int>(status));
  return nullptr;
}

PyObject* head_logits(PyObject*, PyObject* args) {
  unsigned long long hidden, row_index, row_mask, w1, b1, w2, b2, out, workspace, stream;
  long long hidden_rows, hidden_stride, d, num_rows, workspace_bytes;
  int source, dtype, pipeline, dependent_launch, tail;
  if (!PyArg_ParseTuple(args, "KLLLiKKLKKKKKKLiiiiK:head_logits", &hidden, &hidden_rows, &hidden_stride, &d, &source,
                        &row_index, &row_mask, &num_rows, &w1, &b1, &w2, &b2, &out, &workspace, &workspace_bytes,
                        &dtype, &pipeline, &dependent_launch, &tail, &stream))
    return nullptr;
  XbaiHeadLaunch launch;
  launch.hidden = reinterpret_cast<const void*>(hidden);
  launch.hidden_rows = hidden_rows;
  launch.hidden_stride = hidden_stride;
  launch.d = d;
  launch.source = source;
  launch.row_index = reinterpret_cast<const int64_t*>(row_index);
  launch.row_mask = reinterpret_cast<const bool*>(row_mask);
  launch.num_rows = num_rows;
  launch.w1 = reinterpret_cast<const void*>(w1);
  launch.b1 = reinterpret_cast<const void*>(b1);
  launch.w2 = reinterpret_cast<const void*>(w2);
  launch.b2 = reinterpret_cast<const void*>(b2);
  launch.out = reinterpret_cast<float*>(out);
  launch.workspace = reinterpret_cast<void*>(workspace);
  launch.workspace_bytes = workspace_bytes;
  launch.dtype = dtype;
  launch.pipeline = pipeline;
  launch.dependent_launch = dependent_launch;
  launch.tail = tail;
  launch.stream = reinterpret_cast<void*>(stream);
  int32_t status;
  // The launch only enqueues work, but other Python threads may run while the driver does.
  Py_BEGIN_ALLOW_THREADS
  status = xbai_head_logits(&launch);
  Py_END_ALLOW_THREADS
  if (status != XBAI_OK) return raise_status(status);
  Py_RETURN_NONE;
}

PyObject* finish(int32_t status) {
  if (status != XBAI_OK) return raise_status(status);
  Py_RETURN_NONE;
}

PyObject* decode_candidates(PyObject*, PyObject* args) {
  unsigned long long last_token, sampled, slots, step_table, out, stream;
  long long table_size, batch, think_start, no_token;
  if (!PyArg_ParseTuple(args, "KKKKLLLLKK:decode_candidates", &last_token, &sampled, &slots, &step_table,
                        &table_size, &batch, &think_start, &no_token, &out, &stream))
    return nullptr;
  XbaiDecodeCandidates launch;
  launch.last_token = reinterpret_cast<const int64_t*>(last_token);
  launch.sampled = reinterpret_cast<const int64_t*>(sampled);
  launch.slots = reinterpret_cast<const int64_t*>(slots);
  launch.step_table = reinterpret_cast<const bool*>(step_table);
  launch.table_size = table_size;
  launch.batch = batch;
  launch.think_start = think_start;
  launch.no_token = no_token;
  launch.out = reinterpret_cast<bool*>(out);
  launch.stream = reinterpret_cast<void*>(stream);
  return finish(xbai_decode_candidates(&launch));
}

PyObject* decode_record(PyObject*, PyObject* args) {
  unsigned long long events, event_logits, counts, last_token, slots, positions, sampled, is_step, logits, stream;
  long long batch, capacity, think_start, think_end, kind_step, kind_start, kind_end;
  if (!PyArg_ParseTuple(args, "KKKKKKKKKLLLLLLLK:decode_record", &events, &event_logits, &counts, &last_token, &slots,
                        &positions, &sampled, &is_step, &logits, &batch, &capacity, &think_start, &think_end,
                        &kind_step, &kind_start, &kind_end, &stream))
    return nullptr;
  XbaiDecodeRecord launch;
  launch.events = reinterpret_cast<int64_t*>(events);
  launch.event_logits = reinterpret_cast<float*>(event_logits);
  launch.counts = reinterpret_cast<int64_t*>(counts);
  launch.last_token = reinterpret_cast<int64_t*>(last_token);
  launch.slots = reinterpret_cast<const int64_t*>(slots);
  launch.positions = reinterpret_cast<const int64_t*>(positions);
  launch.sampled = reinterpret_cast<const int64_t*>(sampled);
  launch.is_step = reinterpret_cast<const bool*>(is_step);
  launch.logits = reinterpret_cast<const float*>(logits);
  launch.batch = batch;
  launch.capacity = capacity;
  launch.think_start = think_start;
  launch.think_end = think_end;
  launch.kind_step = kind_step;
  launch.kind_think_start = kind_start;
  launch.kind_think_end = kind_end;
  launch.stream = reinterpret_cast<void*>(stream);
  return finish(xbai_decode_record(&launch));
}

PyObject* workspace_bytes(PyObject*, PyObject* args) {
  int source;
  long long num_rows, d;
  if (!PyArg_ParseTuple(args, "iLL:workspace_bytes", &source, &num_rows, &d)) return nullptr;
  return PyLong_FromLongLong(xbai_head_workspace_bytes(source, num_rows, d));
}

PyObject* compiled_targets(PyObject*, PyObject*) { return PyUnicode_FromString(xbai_compiled_targets()); }

PyMethodDef methods[] = {
    {"head_logits", head_logits, METH_VARARGS,
     "head_logits(hidden_ptr, hidden_rows, hidden_stride, d, source, row_index_ptr, row_mask_ptr, num_rows,\n"
     "            w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, workspace_ptr, workspace_bytes, dtype, pipeline,\n"
     "            dependent_launch, tail, stream)\n"
     "Enqueue the SPRM head on `stream`; out (float32 [num_rows]) is written asynchronously."},
    {"decode_candidates", decode_candidates, METH_VARARGS,
     "decode_candidates(last_token_ptr, sampled_ptr, slots_ptr, step_table_ptr, table_size, batch, think_start,\n"
     "                  no_token, out_ptr, stream)\n"
     "Enqueue DecodeScorer's step-candidate test; out (bool [batch]) is written asynchronously."},
    {"decode_record", decode_record, METH_VARARGS,
     "decode_record(events_ptr, event_logits_ptr, counts_ptr, last_token_ptr, slots_ptr, positions_ptr,\n"
     "              sampled_ptr, is_step_ptr, logits_ptr, batch, capacity, think_start, think_end,\n"
     "              kind_step, kind_think_start, kind_think_end, stream)\n"
     "Enqueue DecodeScorer's event append (in place on events, event_logits, counts, last_token)."},
    {"workspace_bytes", workspace_bytes, METH_VARARGS,
     "workspace_bytes(source, num_rows, d) -> int: scratch bytes head_logits needs."},
    {"compiled_targets", compiled_targets, METH_NOARGS, "The GPU targets (sm_XX / compute_XX) compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", "SPRM head CUDA kernels over raw device pointers (no torch).", -1, methods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "ROWS_ALL", XBAI_ROWS_ALL) < 0 ||
      PyModule_AddIntConstant(module, "ROWS_INDEXED", XBAI_ROWS_INDEXED) < 0 ||
      PyModule_AddIntConstant(module, "ROWS_MASKED", XBAI_ROWS_MASKED) < 0 ||
      PyModule_AddIntConstant(module, "FLOAT16", XBAI_FLOAT16) < 0 ||
      PyModule_AddIntConstant(module, "BFLOAT16", XBAI_BFLOAT16) < 0 ||
      PyModule_AddIntConstant(module, "PIPELINE_WIDE", XBAI_PIPELINE_WIDE) < 0 ||
      PyModule_AddIntConstant(module, "PIPELINE_DEEP", XBAI_PIPELINE_DEEP) < 0 ||
      PyModule_AddIntConstant(module, "PIPELINE_AUTO", XBAI_PIPELINE_AUTO) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
