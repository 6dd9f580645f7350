
import os
os.environ['TORCHINDUCTOR_CACHE_DIR'] = '/tmp/torchinductor_root'
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
torch._inductor.config.trace.save_real_tensors = False
torch._functorch.config.functionalize_rng_ops = False
torch._functorch.config.fake_tensor_allow_unsafe_data_ptr_access = True
torch._functorch.config.unlift_effect_tokens = True
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



    def forward(self, primals_1, primals_2, primals_3, primals_4, primals_5, primals_6, primals_7, primals_8, primals_9, primals_10, primals_11, primals_12, primals_13):
        var_mean = torch.ops.aten.var_mean.correction(primals_3, [2], correction = 0, keepdim = True)
        getitem = var_mean[0]
        getitem_1 = var_mean[1];  var_mean = None
        add = torch.ops.aten.add.Tensor(getitem, 1e-05);  getitem = None
        rsqrt = torch.ops.aten.rsqrt.default(add);  add = None
        sub = torch.ops.aten.sub.Tensor(primals_3, getitem_1)
        mul = torch.ops.aten.mul.Tensor(sub, rsqrt);  sub = None
        mul_1 = torch.ops.aten.mul.Tensor(mul, primals_1);  mul = None
        add_1 = torch.ops.aten.add.Tensor(mul_1, primals_2);  mul_1 = primals_2 = None
        view = torch.ops.aten.view.default(add_1, [128, 64]);  add_1 = None
        permute = torch.ops.aten.permute.default(primals_4, [1, 0])
        addmm = torch.ops.aten.addmm.default(primals_5, view, permute);  primals_5 = permute = None
        view_1 = torch.ops.aten.view.default(addmm, [2, 64, 192]);  addmm = None
        split = torch.ops.aten.split.Tensor(view_1, 64, 2);  view_1 = None
        getitem_2 = split[0]
        getitem_3 = split[1]
        getitem_4 = split[2];  split = None
        view_2 = torch.ops.aten.view.default(getitem_2, [2, 64, 2, 32]);  getitem_2 = None
        permute_1 = torch.ops.aten.permute.default(view_2, [0, 2, 1, 3]);  view_2 = None
        view_3 = torch.ops.aten.view.default(getitem_3, [2, 64, 2, 32]);  getitem_3 = None
        permute_2 = torch.ops.aten.permute.default(view_3, [0, 2, 1, 3]);  view_3 = None
        view_4 = torch.ops.aten.view.default(getitem_4, [2, 64, 2, 32]);  getitem_4 = None
        permute_3 = torch.ops.aten.permute.default(view_4, [0, 2, 1, 3]);  view_4 = None
        _scaled_dot_product_flash_attention_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(permute_1, permute_2, permute_3, 0.0, True)
        getitem_5 = _scaled_dot_product_flash_attention_for_cpu[0]
        getitem_6 = _scaled_dot_product_flash_attention_for_cpu[1];  _scaled_dot_product_flash_attention_for_cpu = None
        permute_4 = torch.ops.aten.permute.default(getitem_5, [0, 2, 1, 3])
        view_5 = torch.ops.aten.view.default(permute_4, [2, 64, 64]);  permute_4 = None
        view_6 = torch.ops.aten.view.default(view_5, [128, 64]);  view_5 = None
        permute_5 = torch.ops.aten.permute.default(primals_6, [1, 0])
        addmm_1 = torch.ops.aten.addmm.default(primals_7, view_6, permute_5);  primals_7 = view_6 = permute_5 = None
        view_7 = torch.ops.aten.view.default(addmm_1, [2, 64, 64])
        inductor_seeds_default = torch.ops.prims.inductor_seeds.default(2, device(type='cpu'))
        inductor_lookup_seed_default = torch.ops.prims.inductor_lookup_seed.default(inductor_seeds_default, 0)
        inductor_random_default_1 = torch.ops.prims.inductor_random.default([2, 64, 64], inductor_lookup_seed_default, 'rand');  inductor_lookup_seed_default = None
        gt = torch.ops.aten.gt.Scalar(inductor_random_default_1, 0.1);  inductor_random_default_1 = None
        mul_2 = torch.ops.aten.mul.Tensor(gt, view_7);  view_7 = None
        mul_3 = torch.ops.aten.mul.Tensor(mul_2, 1.1111111111111112);  mul_2 = None
        add_2 = torch.ops.aten.add.Tensor(primals_3, mul_3);  mul_3 = None
        var_mean_1 = torch.ops.aten.var_mean.correction(add_2, [2], correction = 0, keepdim = True)
        getitem_7 = var_mean_1[0]
        getitem_8 = var_mean_1[1];  var_mean_1 = None
        add_3 = torch.ops.aten.add.Tensor(getitem_7, 1e-05);  getitem_7 = None
        rsqrt_1 = torch.ops.aten.rsqrt.default(add_3);  add_3 = None
        sub_1 = torch.ops.aten.sub.Tensor(add_2, getitem_8)
        mul_4 = torch.ops.aten.mul.Tensor(sub_1, rsqrt_1);  sub_1 = None
        mul_5 = torch.ops.aten.mul.Tensor(mul_4, primals_8);  mul_4 = None
        add_4 = torch.ops.aten.add.Tensor(mul_5, primals_9);  mul_5 = primals_9 = None
        view_8 = torch.ops.aten.view.default(add_4, [128, 64]);  add_4 = None
        permute_6 = torch.ops.aten.permute.default(primals_10, [1, 0])
        addmm_2 = torch.ops.aten.addmm.default(primals_11, view_8, permute_6);  primals_11 = permute_6 = None
        view_9 = torch.ops.aten.view.default(addmm_2, [2, 64, 256])
        mul_6 = torch.ops.aten.mul.Tensor(view_9, 0.5)
        mul_7 = torch.ops.aten.mul.Tensor(view_9, 0.7071067811865476);  view_9 = None
        erf = torch.ops.aten.erf.default(mul_7);  mul_7 = None
        add_5 = torch.ops.aten.add.Tensor(erf, 1);  erf = None
        mul_8 = torch.ops.aten.mul.Tensor(mul_6, add_5);  mul_6 = add_5 = None
        view_10 = torch.ops.aten.view.default(mul_8, [128, 256]);  mul_8 = None
        permute_7 = torch.ops.aten.permute.default(primals_12, [1, 0])
        addmm_3 = torch.ops.aten.addmm.default(primals_13, view_10, permute_7);  primals_13 = permute_7 = None
        view_11 = torch.ops.aten.view.default(addmm_3, [2, 64, 64]);  addmm_3 = None
        inductor_lookup_seed_default_1 = torch.ops.prims.inductor_lookup_seed.default(inductor_seeds_default, 1);  inductor_seeds_default = None
        inductor_random_default = torch.ops.prims.inductor_random.default([2, 64, 64], inductor_lookup_seed_default_1, 'rand');  inductor_lookup_seed_default_1 = None
        gt_1 = torch.ops.aten.gt.Scalar(inductor_random_default, 0.1);  inductor_random_default = None
        mul_9 = torch.ops.aten.mul.Tensor(gt_1, view_11);  view_11 = None
        mul_10 = torch.ops.aten.mul.Tensor(mul_9, 1.1111111111111112);  mul_9 = None
        add_6 = torch.ops.aten.add.Tensor(add_2, mul_10);  add_2 = mul_10 = None
        return (add_6, primals_1, primals_3, primals_4, primals_6, primals_8, primals_10, primals_12, getitem_1, rsqrt, view, permute_1, permute_2, permute_3, getitem_5, getitem_6, addmm_1, gt, getitem_8, rsqrt_1, view_8, addmm_2, view_10, gt_1)

def load_args(reader):
    buf0 = reader.storage(None, 256)
    reader.tensor(buf0, (64,), is_leaf=True)  # primals_1
    buf1 = reader.storage(None, 256)
    reader.tensor(buf1, (64,), is_leaf=True)  # primals_2
    buf2 = reader.storage(None, 32768)
    reader.tensor(buf2, (2, 64, 64), is_leaf=True)  # primals_3
    buf3 = reader.storage(None, 49152)
    reader.tensor(buf3, (192, 64), is_leaf=True)  # primals_4
    buf4 = reader.storage(None, 768)
    reader.tensor(buf4, (192,), is_leaf=True)  # primals_5
    buf5 = reader.storage(None, 16384)
    reader.tensor(buf5, (64, 64), is_leaf=True)  # primals_6
    buf6 = reader.storage(None, 256)
    reader.tensor(buf6, (64,), is_leaf=True)  # primals_7
    buf7 = reader.storage(None, 256)
    reader.tensor(buf7, (64,), is_leaf=True)  # primals_8
    buf8 = reader.storage(None, 256)
    reader.tensor(buf8, (64,), is_leaf=True)  # primals_9
    buf9 = reader.storage(None, 65536)
    reader.tensor(buf9, (256, 64), is_leaf=True)  # primals_10
    buf10 = reader.storage(None, 1024)
    reader.tensor(buf10, (256,), is_leaf=True)  # primals_11
    buf11 = reader.storage(None, 65536)
    reader.tensor(buf11, (64, 256), is_leaf=True)  # primals_12
    buf12 = reader.storage(None, 256)
    reader.tensor(buf12, (64,), is_leaf=True)  # primals_13
load_args._version = 0
mod = Repro()
if __name__ == '__main__':
    from torch._dynamo.repro.after_aot import run_repro
    with torch.no_grad():
        run_repro(mod, load_args, accuracy=False, command='run', save_dir=None, tracing_mode='real', check_str=None)
        # To run it separately, do 
        # mod, args = run_repro(mod, load_args, accuracy=False, command='get_args', save_dir=None, tracing_mode='real', check_str=None)
        # mod(*args)