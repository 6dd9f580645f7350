class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[64]", primals_3: "f32[2, 64, 64]", primals_4: "f32[192, 64]", primals_6: "f32[64, 64]", primals_8: "f32[64]", primals_10: "f32[256, 64]", primals_12: "f32[64, 256]", getitem_1: "f32[2, 64, 1]", rsqrt: "f32[2, 64, 1]", view: "f32[128, 64]", permute_1: "f32[2, 2, 64, 32]", permute_2: "f32[2, 2, 64, 32]", permute_3: "f32[2, 2, 64, 32]", getitem_5: "f32[2, 2, 64, 32]", getitem_6: "f32[2, 2, 64]", addmm_1: "f32[128, 64]", gt: "b8[2, 64, 64]", getitem_8: "f32[2, 64, 1]", rsqrt_1: "f32[2, 64, 1]", view_8: "f32[128, 64]", addmm_2: "f32[128, 256]", view_10: "f32[128, 256]", gt_1: "b8[2, 64, 64]", tangents_1: "f32[2, 64, 64]"):
        # File: /work/wt-plandata/src/memfit/models.py:51 in forward, code: return x + self.dropout(self.out(F.gelu(self.fc(self.ln2(x)))))
        convert_element_type: "f32[2, 64, 64]" = torch.ops.prims.convert_element_type.default(gt_1, torch.float32);  gt_1 = None
        mul_11: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(convert_element_type, 1.1111111111111112);  convert_element_type = None
        mul_12: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(tangents_1, mul_11);  mul_11 = None
        view_12: "f32[128, 64]" = torch.ops.aten.reshape.default(mul_12, [128, 64]);  mul_12 = None
        permute_7: "f32[256, 64]" = torch.ops.aten.permute.default(primals_12, [1, 0]);  primals_12 = None
        permute_8: "f32[64, 256]" = torch.ops.aten.permute.default(permute_7, [1, 0]);  permute_7 = None
        mm: "f32[128, 256]" = torch.ops.aten.mm.default(view_12, permute_8);  permute_8 = None
        permute_9: "f32[64, 128]" = torch.ops.aten.permute.default(view_12, [1, 0])
        mm_1: "f32[64, 256]" = torch.ops.aten.mm.default(permute_9, view_10);  permute_9 = view_10 = None
        sum_1: "f32[1, 64]" = torch.ops.aten.sum.dim_IntList(view_12, [0], True);  view_12 = None
        view_13: "f32[64]" = torch.ops.aten.reshape.default(sum_1, [64]);  sum_1 = None
        view_14: "f32[2, 64, 256]" = torch.ops.aten.reshape.default(mm, [2, 64, 256]);  mm = None
        view_9: "f32[2, 64, 256]" = torch.ops.aten.reshape.default(addmm_2, [2, 64, 256]);  addmm_2 = None
        mul_7: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_9, 0.7071067811865476)
        erf: "f32[2, 64, 256]" = torch.ops.aten.erf.default(mul_7);  mul_7 = None
        add_5: "f32[2, 64, 256]" = torch.ops.aten.add.Tensor(erf, 1);  erf = None
        mul_14: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(add_5, 0.5);  add_5 = None
        mul_15: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_9, view_9)
        mul_16: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(mul_15, -0.5);  mul_15 = None
        exp: "f32[2, 64, 256]" = torch.ops.aten.exp.default(mul_16);  mul_16 = None
        mul_17: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(exp, 0.3989422804014327);  exp = None
        mul_18: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_9, mul_17);  view_9 = mul_17 = None
        add_8: "f32[2, 64, 256]" = torch.ops.aten.add.Tensor(mul_14, mul_18);  mul_14 = mul_18 = None
        mul_19: "f32[2, 64, 256]" = torch.ops.aten.mul.Tensor(view_14, add_8);  view_14 = add_8 = None
        view_15: "f32[128, 256]" = torch.ops.aten.reshape.default(mul_19, [128, 256]);  mul_19 = None
        permute_6: "f32[64, 256]" = torch.ops.aten.permute.default(primals_10, [1, 0]);  primals_10 = None
        permute_12: "f32[256, 64]" = torch.ops.aten.permute.default(permute_6, [1, 0]);  permute_6 = None
        mm_2: "f32[128, 64]" = torch.ops.aten.mm.default(view_15, permute_12);  permute_12 = None
        permute_13: "f32[256, 128]" = torch.ops.aten.permute.default(view_15, [1, 0])
        mm_3: "f32[256, 64]" = torch.ops.aten.mm.default(permute_13, view_8);  permute_13 = view_8 = None
        sum_2: "f32[1, 256]" = torch.ops.aten.sum.dim_IntList(view_15, [0], True);  view_15 = None
        view_16: "f32[256]" = torch.ops.aten.reshape.default(sum_2, [256]);  sum_2 = None
        view_17: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(mm_2, [2, 64, 64]);  mm_2 = None
        mul_21: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(view_17, primals_8);  primals_8 = None
        mul_22: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_21, 64)
        sum_3: "f32[2, 64, 1]" = torch.ops.aten.sum.dim_IntList(mul_21, [2], True)

        # File: /work/wt-plandata/src/memfit/models.py:34 in forward, code: return self.dropout(self.proj(y))
        view_7: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(addmm_1, [2, 64, 64]);  addmm_1 = None
        mul_2: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(gt, view_7);  view_7 = None
        mul_3: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_2, 1.1111111111111112);  mul_2 = None

        # File: /work/wt-plandata/src/memfit/models.py:50 in forward, code: x = x + self.attn(self.ln1(x))
        add_2: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(primals_3, mul_3);  mul_3 = None

        # File: /work/wt-plandata/src/memfit/models.py:51 in forward, code: return x + self.dropout(self.out(F.gelu(self.fc(self.ln2(x)))))
        sub_1: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(add_2, getitem_8);  add_2 = getitem_8 = None
        mul_4: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(sub_1, rsqrt_1);  sub_1 = None
        mul_23: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_21, mul_4);  mul_21 = None
        sum_4: "f32[2, 64, 1]" = torch.ops.aten.sum.dim_IntList(mul_23, [2], True);  mul_23 = None
        mul_24: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_4, sum_4);  sum_4 = None
        sub_3: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(mul_22, sum_3);  mul_22 = sum_3 = None
        sub_4: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(sub_3, mul_24);  sub_3 = mul_24 = None
        div: "f32[2, 64, 1]" = torch.ops.aten.div.Tensor(rsqrt_1, 64);  rsqrt_1 = None
        mul_25: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(div, sub_4);  div = sub_4 = None
        mul_26: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(view_17, mul_4);  mul_4 = None
        sum_5: "f32[64]" = torch.ops.aten.sum.dim_IntList(mul_26, [0, 1]);  mul_26 = None
        sum_6: "f32[64]" = torch.ops.aten.sum.dim_IntList(view_17, [0, 1]);  view_17 = None
        add_9: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(tangents_1, mul_25);  tangents_1 = mul_25 = None

        # File: /work/wt-plandata/src/memfit/models.py:34 in forward, code: return self.dropout(self.proj(y))
        convert_element_type_1: "f32[2, 64, 64]" = torch.ops.prims.convert_element_type.default(gt, torch.float32);  gt = None
        mul_27: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_1, 1.1111111111111112);  convert_element_type_1 = None
        mul_28: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(add_9, mul_27);  mul_27 = None
        view_18: "f32[128, 64]" = torch.ops.aten.reshape.default(mul_28, [128, 64]);  mul_28 = None
        permute_5: "f32[64, 64]" = torch.ops.aten.permute.default(primals_6, [1, 0]);  primals_6 = None
        permute_16: "f32[64, 64]" = torch.ops.aten.permute.default(permute_5, [1, 0]);  permute_5 = None
        mm_4: "f32[128, 64]" = torch.ops.aten.mm.default(view_18, permute_16);  permute_16 = None
        permute_17: "f32[64, 128]" = torch.ops.aten.permute.default(view_18, [1, 0])

        # File: /work/wt-plandata/src/memfit/models.py:33 in forward, code: y = y.transpose(1, 2).reshape(batch, seq, width)
        permute_4: "f32[2, 64, 2, 32]" = torch.ops.aten.permute.default(getitem_5, [0, 2, 1, 3])
        view_5: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(permute_4, [2, 64, 64]);  permute_4 = None

        # File: /work/wt-plandata/src/memfit/models.py:34 in forward, code: return self.dropout(self.proj(y))
        view_6: "f32[128, 64]" = torch.ops.aten.reshape.default(view_5, [128, 64]);  view_5 = None
        mm_5: "f32[64, 64]" = torch.ops.aten.mm.default(permute_17, view_6);  permute_17 = view_6 = None
        sum_7: "f32[1, 64]" = torch.ops.aten.sum.dim_IntList(view_18, [0], True);  view_18 = None
        view_19: "f32[64]" = torch.ops.aten.reshape.default(sum_7, [64]);  sum_7 = None
        view_20: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(mm_4, [2, 64, 64]);  mm_4 = None

        # File: /work/wt-plandata/src/memfit/models.py:33 in forward, code: y = y.transpose(1, 2).reshape(batch, seq, width)
        view_21: "f32[2, 64, 2, 32]" = torch.ops.aten.reshape.default(view_20, [2, 64, 2, 32]);  view_20 = None
        permute_20: "f32[2, 2, 64, 32]" = torch.ops.aten.permute.default(view_21, [0, 2, 1, 3]);  view_21 = None

        # File: /work/wt-plandata/src/memfit/models.py:32 in forward, code: y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _scaled_dot_product_flash_attention_for_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(permute_20, permute_1, permute_2, permute_3, getitem_5, getitem_6, 0.0, True);  permute_20 = permute_1 = permute_2 = permute_3 = getitem_5 = getitem_6 = None
        getitem_9: "f32[2, 2, 64, 32]" = _scaled_dot_product_flash_attention_for_cpu_backward[0]
        getitem_10: "f32[2, 2, 64, 32]" = _scaled_dot_product_flash_attention_for_cpu_backward[1]
        getitem_11: "f32[2, 2, 64, 32]" = _scaled_dot_product_flash_attention_for_cpu_backward[2];  _scaled_dot_product_flash_attention_for_cpu_backward = None

        # File: /work/wt-plandata/src/memfit/models.py:31 in <genexpr>, code: q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        permute_21: "f32[2, 64, 2, 32]" = torch.ops.aten.permute.default(getitem_11, [0, 2, 1, 3]);  getitem_11 = None
        view_22: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(permute_21, [2, 64, 64]);  permute_21 = None
        permute_22: "f32[2, 64, 2, 32]" = torch.ops.aten.permute.default(getitem_10, [0, 2, 1, 3]);  getitem_10 = None
        view_23: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(permute_22, [2, 64, 64]);  permute_22 = None
        permute_23: "f32[2, 64, 2, 32]" = torch.ops.aten.permute.default(getitem_9, [0, 2, 1, 3]);  getitem_9 = None
        view_24: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(permute_23, [2, 64, 64]);  permute_23 = None

        # File: /work/wt-plandata/src/memfit/models.py:29 in forward, code: q, k, v = self.qkv(x).split(width, dim=2)
        cat: "f32[2, 64, 192]" = torch.ops.aten.cat.default([view_24, view_23, view_22], 2);  view_24 = view_23 = view_22 = None
        view_25: "f32[128, 192]" = torch.ops.aten.reshape.default(cat, [128, 192]);  cat = None
        permute: "f32[64, 192]" = torch.ops.aten.permute.default(primals_4, [1, 0]);  primals_4 = None
        permute_24: "f32[192, 64]" = torch.ops.aten.permute.default(permute, [1, 0]);  permute = None
        mm_6: "f32[128, 64]" = torch.ops.aten.mm.default(view_25, permute_24);  permute_24 = None
        permute_25: "f32[192, 128]" = torch.ops.aten.permute.default(view_25, [1, 0])
        mm_7: "f32[192, 64]" = torch.ops.aten.mm.default(permute_25, view);  permute_25 = view = None
        sum_8: "f32[1, 192]" = torch.ops.aten.sum.dim_IntList(view_25, [0], True);  view_25 = None
        view_26: "f32[192]" = torch.ops.aten.reshape.default(sum_8, [192]);  sum_8 = None
        view_27: "f32[2, 64, 64]" = torch.ops.aten.reshape.default(mm_6, [2, 64, 64]);  mm_6 = None

        # File: /work/wt-plandata/src/memfit/models.py:50 in forward, code: x = x + self.attn(self.ln1(x))
        mul_30: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(view_27, primals_1);  primals_1 = None
        mul_31: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_30, 64)
        sum_9: "f32[2, 64, 1]" = torch.ops.aten.sum.dim_IntList(mul_30, [2], True)
        sub: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(primals_3, getitem_1);  primals_3 = getitem_1 = None
        mul: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(sub, rsqrt);  sub = None
        mul_32: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul_30, mul);  mul_30 = None
        sum_10: "f32[2, 64, 1]" = torch.ops.aten.sum.dim_IntList(mul_32, [2], True);  mul_32 = None
        mul_33: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(mul, sum_10);  sum_10 = None
        sub_6: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(mul_31, sum_9);  mul_31 = sum_9 = None
        sub_7: "f32[2, 64, 64]" = torch.ops.aten.sub.Tensor(sub_6, mul_33);  sub_6 = mul_33 = None
        div_1: "f32[2, 64, 1]" = torch.ops.aten.div.Tensor(rsqrt, 64);  rsqrt = None
        mul_34: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(div_1, sub_7);  div_1 = sub_7 = None
        mul_35: "f32[2, 64, 64]" = torch.ops.aten.mul.Tensor(view_27, mul);  mul = None
        sum_11: "f32[64]" = torch.ops.aten.sum.dim_IntList(mul_35, [0, 1]);  mul_35 = None
        sum_12: "f32[64]" = torch.ops.aten.sum.dim_IntList(view_27, [0, 1]);  view_27 = None
        add_10: "f32[2, 64, 64]" = torch.ops.aten.add.Tensor(add_9, mul_34);  add_9 = mul_34 = None
        return (sum_11, sum_12, add_10, mm_7, view_26, mm_5, view_19, sum_5, sum_6, mm_3, view_16, mm_1, view_13)
