class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[64]", primals_2: "f32[64]", primals_3: "f32[2, 64, 64]", primals_4: "f32[192, 64]", primals_5: "f32[192]", primals_6: "f32[64, 64]", primals_7: "f32[64]", primals_8: "f32[64]", primals_9: "f32[64]", primals_10: "f32[256, 64]", primals_11: "f32[256]", primals_12: "f32[64, 256]", primals_13: "f32[64]"):
        # File: /work/wt-plandata/src/memfit/models.py:50 in forward, code: x = x + self.attn(self.ln1(x))
        var_mean = torch.ops.aten.var_mean.correction(primals_3, [2], correction = 0, keepdim = True)
        getitem: "f32[2, 64, 1]" = var_mean[0]
        getitem_1: "f32[2, 64, 1]" = var_mean[1];  var_mean = None
        add: "f32[2, 64, 1]" = torch.ops.aten.add.Tensor(getitem, 1e-05);  getitem = None
        rsqrt: "f32[2, 64, 1]" = torch.ops.aten.rsqrt.default(add);  add = None
        sub: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(primals_3, getitem_1)
        mul: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(sub, rsqrt);  sub = None
        mul_1: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul, primals_1);  mul = None
        add_1: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(mul_1, primals_2);  mul_1 = primals_2 = None

        # File: /work/wt-plandata/src/memfit/models.py:29 in forward, code: q, k, v = self.qkv(x).split(width, dim=2)
        view: "f32[128, 64]" = torch.ops.aten.view.default(add_1, [128, 64]);  add_1 = None
        permute: "f32[64, 192]" = torch.ops.aten.permute.default(primals_4, [1, 0])
        addmm: "f32[128, 192]" = torch.ops.aten.addmm.default(primals_5, view, permute);  primals_5 = permute = None
        view_1: "f32[2, 64, 192]" = torch.ops.aten.view.default(addmm, [2, 64, 192]);  addmm = None
        split = torch.ops.aten.split.Tensor(view_1, 64, 2);  view_1 = None
        getitem_2: "f32[2, 64, 64]" = split[0]
        getitem_3: "f32[2, 64, 64]" = split[1]
        getitem_4: "f32[2, 64, 64]" = split[2];  split = None

        # File: /work/wt-plandata/src/memfit/models.py:31 in <genexpr>, code: q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        view_2: "f32[2, 64, 2, 32]" = torch.ops.aten.view.default(getitem_2, [2, 64, 2, 32]);  getitem_2 = None
        permute_1: "f32[2, 2, 64, 32]" = torch.ops.aten.permute.default(view_2, [0, 2, 1, 3]);  view_2 = None
        view_3: "f32[2, 64, 2, 32]" = torch.ops.aten.view.default(getitem_3, [2, 64, 2, 32]);  getitem_3 = None
        permute_2: "f32[2, 2, 64, 32]" = torch.ops.aten.permute.default(view_3, [0, 2, 1, 3]);  view_3 = None
        view_4: "f32[2, 64, 2, 32]" = torch.ops.aten.view.default(getitem_4, [2, 64, 2, 32]);  getitem_4 = None
        permute_3: "f32[2, 2, 64, 32]" = torch.ops.aten.permute.default(view_4, [0, 2, 1, 3]);  view_4 = None

        # File: /work/wt-plandata/src/memfit/models.py:32 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _scaled_dot_product_flash_attention_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(permute_1, permute_2, permute_3, 0.0, True)
        getitem_5: "f32[2, 2, 64, 32]" = _scaled_dot_product_flash_attention_for_cpu[0]
        getitem_6: "f32[2, 2, 64]" = _scaled_dot_product_flash_attention_for_cpu[1];  _scaled_dot_product_flash_attention_for_cpu = None

        # File: /work/wt-plandata/src/memfit/models.py:33 in forward, code: y = y.transpose(1, 2).reshape(batch, seq, width)
        permute_4: "f32[2, 64, 2, 32]" = torch.ops.aten.permute.default(getitem_5, [0, 2, 1, 3])
        view_5: "f32[2, 64, 64]" = torch.ops.aten.view.default(permute_4, [2, 64, 64]);  permute_4 = None

        # File: /work/wt-plandata/src/memfit/models.py:34 in forward, code: return self.dropout(self.proj(y))
        view_6: "f32[128, 64]" = torch.ops.aten.view.default(view_5, [128, 64]);  view_5 = None
        permute_5: "f32[64, 64]" = torch.ops.aten.permute.default(primals_6, [1, 0])
        addmm_1: "f32[128, 64]" = torch.ops.aten.addmm.default(primals_7, view_6, permute_5);  primals_7 = view_6 = permute_5 = None
        view_7: "f32[2, 64, 64]" = torch.ops.aten.view.default(addmm_1, [2, 64, 64])

        # No stacktrace found for following nodes
        inductor_seeds_default: "i64[2]" = torch.ops.prims.inductor_seeds.default(2, device(type='cpu'))

        # File: /work/wt-plandata/src/memfit/models.py:34 in forward, code: return self.dropout(self.proj(y))
        inductor_lookup_seed_default: "i64[]" = torch.ops.prims.inductor_lookup_seed.default(inductor_seeds_default, 0)
        inductor_random_default_1: "f32[2, 64, 64]" = torch.ops.prims.inductor_random.default([2, 64, 64], inductor_lookup_seed_default, 'rand');  inductor_lookup_seed_default = None
        gt: "b8[2, 64, 64]" = torch.ops.aten.gt.Scalar(inductor_random_default_1, 0.1);  inductor_random_default_1 = None
        mul_2: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(gt, view_7);  view_7 = None
        mul_3: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_2, 1.1111111111111112);  mul_2 = None

        # File: /work/wt-plandata/src/memfit/models.py:50 in forward, code: x = x + self.attn(self.ln1(x))
        add_2: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(primals_3, mul_3);  mul_3 = None

        # File: /work/wt-plandata/src/memfit/models.py:51 in forward, code: return x + self.dropout(self.out(F.gelu(self.fc(self.ln2(x)))))
        var_mean_1 = torch.ops.aten.var_mean.correction(add_2, [2], correction = 0, keepdim = True)
        getitem_7: "f32[2, 64, 1]" = var_mean_1[0]
        getitem_8: "f32[2, 64, 1]" = var_mean_1[1];  var_mean_1 = None
        add_3: "f32[2, 64, 1]" = torch.ops.aten.add.Tensor(getitem_7, 1e-05);  getitem_7 = None
        rsqrt_1: "f32[2, 64, 1]" = torch.ops.aten.rsqrt.default(add_3);  add_3 = None
        sub_1: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(add_2, getitem_8)
        mul_4: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(sub_1, rsqrt_1);  sub_1 = None
        mul_5: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_4, primals_8);  mul_4 = None
        add_4: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(mul_5, primals_9);  mul_5 = primals_9 = None
        view_8: "f32[128, 64]" = torch.ops.aten.view.default(add_4, [128, 64]);  add_4 = None
        permute_6: "f32[64, 256]" = torch.ops.aten.permute.default(primals_10, [1, 0])
        addmm_2: "f32[128, 256]" = torch.ops.aten.addmm.default(primals_11, view_8, permute_6);  primals_11 = permute_6 = None
        view_9: "f32[2, 64, 256]" = torch.ops.aten.view.default(addmm_2, [2, 64, 256])
        mul_6: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_9, 0.5)
        mul_7: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_9, 0.7071067811865476);  view_9 = None
        erf: "f32[2, 64, 256]" = torch.ops.aten.erf.default(mul_7);  mul_7 = None
        add_5: "f32[2, 64, 256]" = torch.ops.aten.add.Tensor(erf, 1);  erf = None
        mul_8: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(mul_6, add_5);  mul_6 = add_5 = None
        view_10: "f32[128, 256]" = torch.ops.aten.view.default(mul_8, [128, 256]);  mul_8 = None
        permute_7: "f32[256, 64]" = torch.ops.aten.permute.default(primals_12, [1, 0])
        addmm_3: "f32[128, 64]" = torch.ops.aten.addmm.default(primals_13, view_10, permute_7);  primals_13 = permute_7 = None
        view_11: "f32[2, 64, 64]" = torch.ops.aten.view.default(addmm_3, [2, 64, 64]);  addmm_3 = None
        inductor_lookup_seed_default_1: "i64[]" = torch.ops.prims.inductor_lookup_seed.default(inductor_seeds_default, 1);  inductor_seeds_default = None
        inductor_random_default: "f32[2, 64, 64]" = torch.ops.prims.inductor_random.default([2, 64, 64], inductor_lookup_seed_default_1, 'rand');  inductor_lookup_seed_default_1 = None
        gt_1: "b8[2, 64, 64]" = torch.ops.aten.gt.Scalar(inductor_random_default, 0.1);  inductor_random_default = None
        mul_9: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(gt_1, view_11);  view_11 = None
        mul_10: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_9, 1.1111111111111112);  mul_9 = None
        add_6: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(add_2, mul_10);  add_2 = mul_10 = None
        return (add_6, primals_1, primals_3, primals_4, primals_6, primals_8, primals_10, primals_12, getitem_1, rsqrt, view, permute_1, permute_2, permute_3, getitem_5, getitem_6, addmm_1, gt, getitem_8, rsqrt_1, view_8, addmm_2, view_10, gt_1)
