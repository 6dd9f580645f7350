
import os
os.environ['TORCHINDUCTOR_CACHE_DIR'] = '/tmp/torchinductor_root'
os.environ['_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR'] = '140670665411616'
os.environ.pop('TORCHDYNAMO_REPRO_AFTER', None)
os.environ.pop('TORCHDYNAMO_REPRO_LEVEL', None)

import torch
from torch import tensor, device
import torch.fx as fx
from torch._dynamo.testing import rand_strided
from math import inf
import torch._inductor.inductor_prims



import torch._dynamo.config
import torch._inductor.config
import torch._functorch.config
import torch.fx.experimental._config

torch._inductor.config.trace.enabled = False
torch._inductor.config.triton.store_cubin = False
torch._inductor.config.comprehensive_padding = True
torch._inductor.config.deterministic = False
torch._inductor.config.trace.save_real_tensors = False
torch._inductor.config.inplace_buffers = True
torch._functorch.config.functionalize_rng_ops = False
torch._functorch.config.fake_tensor_allow_unsafe_data_ptr_access = True
torch._functorch.config.unlift_effect_tokens = False
torch._functorch.config.selective_decompose = False



isolate_fails_code_str = None





if "__compile_source__" in globals():
    import inspect as __after_aot_inspect
    import linecache as __after_aot_linecache
    __after_aot_filename = __after_aot_inspect.currentframe().f_code.co_filename
    __after_aot_linecache.cache[__after_aot_filename] = (
        len(__compile_source__),
        None,
        __compile_source__.splitlines(True),
        __after_aot_filename,
    )
# torch version: 2.13.0+cpu
# torch cuda version: None
# torch git version: cf30153c4c131c8164ee7798e5022d810682e2cb


# torch.cuda.is_available()==False, no GPU info collected
torch._higher_order_ops.triton_kernel_wrap.kernel_side_table.reset_table()

from torch.nn import *
class Repro(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()



    def forward(self, primals_1, primals_3, primals_4, primals_6, primals_8, primals_10, primals_12, getitem_1, rsqrt, view, permute_1, permute_2, permute_3, getitem_5, getitem_6, addmm_1, gt, getitem_8, rsqrt_1, view_8, addmm_2, view_10, gt_1, tangents_1):
        convert_element_type = torch.ops.prims.convert_element_type.default(gt_1, torch.float32);  gt_1 = None
        mul_11 = torch.ops.aten.mul.Tensor(convert_element_type, 1.1111111111111112);  convert_element_type = None
        mul_12 = torch.ops.aten.mul.Tensor(tangents_1, mul_11);  mul_11 = None
        view_12 = torch.ops.aten.view.default(mul_12, [128, 64]);  mul_12 = None
        permute_7 = torch.ops.aten.permute.default(primals_12, [1, 0]);  primals_12 = None
        permute_8 = torch.ops.aten.permute.default(permute_7, [1, 0]);  permute_7 = None
        mm = torch.ops.aten.mm.default(view_12, permute_8);  permute_8 = None
        permute_9 = torch.ops.aten.permute.default(view_12, [1, 0])
        mm_1 = torch.ops.aten.mm.default(permute_9, view_10);  permute_9 = view_10 = None
        sum_1 = torch.ops.aten.sum.dim_IntList(view_12, [0], True);  view_12 = None
        view_13 = torch.ops.aten.view.default(sum_1, [64]);  sum_1 = None
        view_14 = torch.ops.aten.view.default(mm, [2, 64, 256]);  mm = None
        view_9 = torch.ops.aten.view.default(addmm_2, [2, 64, 256]);  addmm_2 = None
        mul_7 = torch.ops.aten.mul.Tensor(view_9, 0.7071067811865476)
        erf = torch.ops.aten.erf.default(mul_7);  mul_7 = None
        add_5 = torch.ops.aten.add.Tensor(erf, 1);  erf = None
        mul_14 = torch.ops.aten.mul.Tensor(add_5, 0.5);  add_5 = None
        mul_15 = torch.ops.aten.mul.Tensor(view_9, view_9)
        mul_16 = torch.ops.aten.mul.Tensor(mul_15, -0.5);  mul_15 = None
        exp = torch.ops.aten.exp.default(mul_16);  mul_16 = None
        mul_17 = torch.ops.aten.mul.Tensor(exp, 0.3989422804014327);  exp = None
        mul_18 = torch.ops.aten.mul.Tensor(view_9, mul_17);  view_9 = mul_17 = None
        add_8 = torch.ops.aten.add.Tensor(mul_14, mul_18);  mul_14 = mul_18 = None
        mul_19 = torch.ops.aten.mul.Tensor(view_14, add_8);  view_14 = add_8 = None
        view_15 = torch.ops.aten.view.default(mul_19, [128, 256]);  mul_19 = None
        permute_6 = torch.ops.aten.permute.default(primals_10, [1, 0]);  primals_10 = None
        permute_12 = torch.ops.aten.permute.default(permute_6, [1, 0]);  permute_6 = None
        mm_2 = torch.ops.aten.mm.default(view_15, permute_12);  permute_12 = None
        permute_13 = torch.ops.aten.permute.default(view_15, [1, 0])
        mm_3 = torch.ops.aten.mm.default(permute_13, view_8);  permute_13 = view_8 = None
        sum_2 = torch.ops.aten.sum.dim_IntList(view_15, [0], True);  view_15 = None
        view_16 = torch.ops.aten.view.default(sum_2, [256]);  sum_2 = None
        view_17 = torch.ops.aten.view.default(mm_2, [2, 64, 64]);  mm_2 = None
        mul_21 = torch.ops.aten.mul.Tensor(view_17, primals_8);  primals_8 = None
        mul_22 = torch.ops.aten.mul.Tensor(mul_21, 64)
        sum_3 = torch.ops.aten.sum.dim_IntList(mul_21, [2], True)
        view_7 = torch.ops.aten.view.default(addmm_1, [2, 64, 64]);  addmm_1 = None
        mul_2 = torch.ops.aten.mul.Tensor(gt, view_7);  view_7 = None
        mul_3 = torch.ops.aten.mul.Tensor(mul_2, 1.1111111111111112);  mul_2 = None
        add_2 = torch.ops.aten.add.Tensor(primals_3, mul_3);  mul_3 = None
        sub_1 = torch.ops.aten.sub.Tensor(add_2, getitem_8);  add_2 = getitem_8 = None
        mul_4 = torch.ops.aten.mul.Tensor(sub_1, rsqrt_1);  sub_1 = None
        mul_23 = torch.ops.aten.mul.Tensor(mul_21, mul_4);  mul_21 = None
        sum_4 = torch.ops.aten.sum.dim_IntList(mul_23, [2], True);  mul_23 = None
        mul_24 = torch.ops.aten.mul.Tensor(mul_4, sum_4);  sum_4 = None
        sub_3 = torch.ops.aten.sub.Tensor(mul_22, sum_3);  mul_22 = sum_3 = None
        sub_4 = torch.ops.aten.sub.Tensor(sub_3, mul_24);  sub_3 = mul_24 = None
        div = torch.ops.aten.div.Tensor(rsqrt_1, 64);  rsqrt_1 = None
        mul_25 = torch.ops.aten.mul.Tensor(div, sub_4);  div = sub_4 = None
        mul_26 = torch.ops.aten.mul.Tensor(view_17, mul_4);  mul_4 = None
        sum_5 = torch.ops.aten.sum.dim_IntList(mul_26, [0, 1]);  mul_26 = None
        sum_6 = torch.ops.aten.sum.dim_IntList(view_17, [0, 1]);  view_17 = None
        add_9 = torch.ops.aten.add.Tensor(tangents_1, mul_25);  tangents_1 = mul_25 = None
        convert_element_type_1 = torch.ops.prims.convert_element_type.default(gt, torch.float32);  gt = None
        mul_27 = torch.ops.aten.mul.Tensor(convert_element_type_1, 1.1111111111111112);  convert_element_type_1 = None
        mul_28 = torch.ops.aten.mul.Tensor(add_9, mul_27);  mul_27 = None
        view_18 = torch.ops.aten.view.default(mul_28, [128, 64]);  mul_28 = None
        permute_5 = torch.ops.aten.permute.default(primals_6, [1, 0]);  primals_6 = None
        permute_16 = torch.ops.aten.permute.default(permute_5, [1, 0]);  permute_5 = None
        mm_4 = torch.ops.aten.mm.default(view_18, permute_16);  permute_16 = None
        permute_17 = torch.ops.aten.permute.default(view_18, [1, 0])
        permute_4 = torch.ops.aten.permute.default(getitem_5, [0, 2, 1, 3])
        view_5 = torch.ops.aten.view.default(permute_4, [2, 64, 64]);  permute_4 = None
        view_6 = torch.ops.aten.view.default(view_5, [128, 64]);  view_5 = None
        mm_5 = torch.ops.aten.mm.default(permute_17, view_6);  permute_17 = view_6 = None
        sum_7 = torch.ops.aten.sum.dim_IntList(view_18, [0], True);  view_18 = None
        view_19 = torch.ops.aten.view.default(sum_7, [64]);  sum_7 = None
        view_20 = torch.ops.aten.view.default(mm_4, [2, 64, 64]);  mm_4 = None
        view_21 = torch.ops.aten.view.default(view_20, [2, 64, 2, 32]);  view_20 = None
        permute_20 = torch.ops.aten.permute.default(view_21, [0, 2, 1, 3]);  view_21 = None
        _scaled_dot_product_flash_attention_for_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(permute_20, permute_1, permute_2, permute_3, getitem_5, getitem_6, 0.0, True);  permute_20 = permute_1 = permute_2 = permute_3 = getitem_5 = getitem_6 = None
        getitem_9 = _scaled_dot_product_flash_attention_for_cpu_backward[0]
        getitem_10 = _scaled_dot_product_flash_attention_for_cpu_backward[1]
        getitem_11 = _scaled_dot_product_flash_attention_for_cpu_backward[2];  _scaled_dot_product_flash_attention_for_cpu_backward = None
        permute_21 = torch.ops.aten.permute.default(getitem_11, [0, 2, 1, 3]);  getitem_11 = None
        view_22 = torch.ops.aten.view.default(permute_21, [2, 64, 64]);  permute_21 = None
        permute_22 = torch.ops.aten.permute.default(getitem_10, [0, 2, 1, 3]);  getitem_10 = None
        view_23 = torch.ops.aten.view.default(permute_22, [2, 64, 64]);  permute_22 = None
        permute_23 = torch.ops.aten.permute.default(getitem_9, [0, 2, 1, 3]);  getitem_9 = None
        view_24 = torch.ops.aten.view.default(permute_23, [2, 64, 64]);  permute_23 = None
        cat = torch.ops.aten.cat.default([view_24, view_23, view_22], 2);  view_24 = view_23 = view_22 = None
        view_25 = torch.ops.aten.view.default(cat, [128, 192]);  cat = None
        permute = torch.ops.aten.permute.default(primals_4, [1, 0]);  primals_4 = None
        permute_24 = torch.ops.aten.permute.default(permute, [1, 0]);  permute = None
        mm_6 = torch.ops.aten.mm.default(view_25, permute_24);  permute_24 = None
        permute_25 = torch.ops.aten.permute.default(view_25, [1, 0])
        mm_7 = torch.ops.aten.mm.default(permute_25, view);  permute_25 = view = None
        sum_8 = torch.ops.aten.sum.dim_IntList(view_25, [0], True);  view_25 = None
        view_26 = torch.ops.aten.view.default(sum_8, [192]);  sum_8 = None
        view_27 = torch.ops.aten.view.default(mm_6, [2, 64, 64]);  mm_6 = None
        mul_30 = torch.ops.aten.mul.Tensor(view_27, primals_1);  primals_1 = None
        mul_31 = torch.ops.aten.mul.Tensor(mul_30, 64)
        sum_9 = torch.ops.aten.sum.dim_IntList(mul_30, [2], True)
        sub = torch.ops.aten.sub.Tensor(primals_3, getitem_1);  primals_3 = getitem_1 = None
        mul = torch.ops.aten.mul.Tensor(sub, rsqrt);  sub = None
        mul_32 = torch.ops.aten.mul.Tensor(mul_30, mul);  mul_30 = None
        sum_10 = torch.ops.aten.sum.dim_IntList(mul_32, [2], True);  mul_32 = None
        mul_33 = torch.ops.aten.mul.Tensor(mul, sum_10);  sum_10 = None
        sub_6 = torch.ops.aten.sub.Tensor(mul_31, sum_9);  mul_31 = sum_9 = None
        sub_7 = torch.ops.aten.sub.Tensor(sub_6, mul_33);  sub_6 = mul_33 = None
        div_1 = torch.ops.aten.div.Tensor(rsqrt, 64);  rsqrt = None
        mul_34 = torch.ops.aten.mul.Tensor(div_1, sub_7);  div_1 = sub_7 = None
        mul_35 = torch.ops.aten.mul.Tensor(view_27, mul);  mul = None
        sum_11 = torch.ops.aten.sum.dim_IntList(mul_35, [0, 1]);  mul_35 = None
        sum_12 = torch.ops.aten.sum.dim_IntList(view_27, [0, 1]);  view_27 = None
        add_10 = torch.ops.aten.add.Tensor(add_9, mul_34);  add_9 = mul_34 = None
        return (sum_11, sum_12, add_10, mm_7, view_26, mm_5, view_19, sum_5, sum_6, mm_3, view_16, mm_1, view_13)

def load_args(reader):
    buf0 = reader.storage(None, 256)
    reader.tensor(buf0, (64,), is_leaf=True)  # primals_1
    buf1 = reader.storage(None, 32768)
    reader.tensor(buf1, (2, 64, 64), is_leaf=True)  # primals_3
    buf2 = reader.storage(None, 49152)
    reader.tensor(buf2, (192, 64), is_leaf=True)  # primals_4
    buf3 = reader.storage(None, 16384)
    reader.tensor(buf3, (64, 64), is_leaf=True)  # primals_6
    buf4 = reader.storage(None, 256)
    reader.tensor(buf4, (64,), is_leaf=True)  # primals_8
    buf5 = reader.storage(None, 65536)
    reader.tensor(buf5, (256, 64), is_leaf=True)  # primals_10
    buf6 = reader.storage(None, 65536)
    reader.tensor(buf6, (64, 256), is_leaf=True)  # primals_12
    buf7 = reader.storage(None, 512)
    reader.tensor(buf7, (2, 64, 1), is_leaf=True)  # getitem_1
    buf8 = reader.storage(None, 512)
    reader.tensor(buf8, (2, 64, 1), is_leaf=True)  # rsqrt
    buf9 = reader.storage(None, 32768)
    reader.tensor(buf9, (128, 64), is_leaf=True)  # view
    buf10 = reader.storage(None, 98304)
    reader.tensor(buf10, (2, 2, 64, 32), (12288, 32, 192, 1), is_leaf=True)  # permute_1
    reader.tensor(buf10, (2, 2, 64, 32), (12288, 32, 192, 1), storage_offset=64, is_leaf=True)  # permute_2
    reader.tensor(buf10, (2, 2, 64, 32), (12288, 32, 192, 1), storage_offset=128, is_leaf=True)  # permute_3
    buf11 = reader.storage(None, 32768)
    reader.tensor(buf11, (2, 2, 64, 32), (4096, 32, 64, 1), is_leaf=True)  # getitem_5
    buf12 = reader.storage(None, 1024)
    reader.tensor(buf12, (2, 2, 64), (128, 1, 2), is_leaf=True)  # getitem_6
    buf13 = reader.storage(None, 32768)
    reader.tensor(buf13, (128, 64), is_leaf=True)  # addmm_1
    buf14 = reader.storage(None, 8192, dtype_hint=torch.bool)
    reader.tensor(buf14, (2, 64, 64), dtype=torch.bool, is_leaf=True)  # gt
    buf15 = reader.storage(None, 512)
    reader.tensor(buf15, (2, 64, 1), is_leaf=True)  # getitem_8
    buf16 = reader.storage(None, 512)
    reader.tensor(buf16, (2, 64, 1), is_leaf=True)  # rsqrt_1
    buf17 = reader.storage(None, 32768)
    reader.tensor(buf17, (128, 64), is_leaf=True)  # view_8
    buf18 = reader.storage(None, 131072)
    reader.tensor(buf18, (128, 256), is_leaf=True)  # addmm_2
    buf19 = reader.storage(None, 131072)
    reader.tensor(buf19, (128, 256), is_leaf=True)  # view_10
    buf20 = reader.storage(None, 8192, dtype_hint=torch.bool)
    reader.tensor(buf20, (2, 64, 64), dtype=torch.bool, is_leaf=True)  # gt_1
    buf21 = reader.storage(None, 32768)
    reader.tensor(buf21, (2, 64, 64), is_leaf=True)  # tangents_1
load_args._version = 0
mod = Repro()
if __name__ == '__main__':
    from torch._dynamo.repro.after_aot import run_repro
    with torch.no_grad():
        run_repro(mod, load_args, accuracy=False, command='run', save_dir=None, tracing_mode='real', check_str=None)
        # To run it separately, do 
        # mod, args = run_repro(mod, load_args, accuracy=False, command='get_args', save_dir=None, tracing_mode='real', check_str=None)
        # mod(*args)