// DeepSpeed's CPU Adam kernel (its csrc/adam/cpu_adam_impl.cpp, compiled beside this file by
// pangu_model/host_adam.py) bound with the GIL released while it runs. DeepSpeed's own binding keeps the
// GIL for the whole update, so ECSS's host update on a worker thread stopped the training thread.
#include "cpu_adam.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("adam_update",
          &ds_adam_step,
          "Adam update of one host tensor (GIL released)",
          pybind11::call_guard<pybind11::gil_scoped_release>());
    m.def("create_adam", &create_adam_optimizer, "a kernel state, by id");
    m.def("destroy_adam", &destroy_adam_optimizer, "free a kernel state");
}
