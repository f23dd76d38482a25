"""CLIP and SigLIP losses that never hold the N x N logits: computed block by block, recomputed in backward.

The plain losses materialise the N x N logit matrix and autograd keeps it (and its softmax or
sigmoid) for the backward pass: about 4 x 4 N^2 bytes, 16 GiB at N = 32,768. Here the rows are
taken ``chunk`` at a time. The forward pass keeps only per-row and per-column log-sum-exps (CLIP)
or nothing (SigLIP); the backward pass rebuilds each block from the embeddings and turns it into
the gradient right away. Peak memory is O(chunk x N) instead of O(N^2), for one more pass of
matmuls (the forward's, repeated in backward). Same loss and gradients as the plain functions, in
float32 throughout (tested against them in float64).

CLIP, L = t X Y^T:  loss = (sum_i lse_j L_ij + sum_j lse_i L_ij - 2 sum_i L_ii) / 2N,
                    dloss/dL_ij = (softmax_row(L)_ij + softmax_col(L)_ij - 2 [i = j]) / 2N.
SigLIP, L = t X Y^T + b:  loss = (sum_ij softplus(L_ij) - sum_i L_ii) / N,
                          dloss/dL_ij = (sigmoid(L_ij) - [i = j]) / N.
The gradient of a block G goes to X (t G Y), to Y (t G^T X), to t (sum G * X Y^T) and to b (sum G).
"""

from __future__ import annotations

import torch
from torch import Tensor


CHUNK_HINT = ("chunk_size computes the loss block by block for one caption per image, unweighted, without "
              "label smoothing (clipforge.objectives.chunked); remove chunk_size for this recipe")


def _blocks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _wide(*tensors: Tensor) -> tuple[Tensor, ...]:
    """float32 at least (bf16/fp16 embeddings from autocast are upcast; float64 stays float64)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(v.to(dtype) for v in tensors)


def _no_autocast(x: Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _block_gradients(xf: Tensor, yf: Tensor, tf: Tensor, chunk: int, off_diagonal_grad) -> tuple[Tensor, ...]:
    """Gradients to X, Y, t and b from dloss/dL, rebuilt block by block. ``off_diagonal_grad(similarity,
    start, end)`` gives a block's dloss/dL without the positives' term, which is -1/N on the diagonal
    for both losses (CLIP: -2 [i = j] / 2N; SigLIP: -[i = j] / N) and is added here."""
    n = xf.shape[0]
    gx, gy = torch.zeros_like(xf), torch.zeros_like(yf)
    gt, gb = torch.zeros((), device=xf.device, dtype=xf.dtype), torch.zeros((), device=xf.device, dtype=xf.dtype)
    for s, e in _blocks(n, chunk):
        similarity = xf[s:e] @ yf.T
        g = off_diagonal_grad(similarity, s, e)
        gx[s:e] += tf * (g @ yf)
        gy += tf * (g.T @ xf[s:e])
        gt += (g * similarity).sum()
        gb += g.sum()
    gx -= tf / n * yf
    gy -= tf / n * xf
    gt -= (xf * yf).sum() / n
    return gx, gy, gt, gb - 1.0


class _ChunkedClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, t: Tensor, chunk: int):
        with _no_autocast(x):
            xf, yf, tf = _wide(x, y, t)
            n = x.shape[0]
            row_lse = torch.empty(n, device=x.device, dtype=xf.dtype)
            col_max = torch.full((n,), float("-inf"), device=x.device, dtype=xf.dtype)
            col_sum = torch.zeros(n, device=x.device, dtype=xf.dtype)
            diag = torch.empty(n, device=x.device, dtype=xf.dtype)
            row_right = torch.zeros((), device=x.device, dtype=xf.dtype)
            for s, e in _blocks(n, chunk):
                block = (tf * xf[s:e]) @ yf.T  # c x N
                rows = torch.arange(e - s, device=x.device)
                diag[s:e] = block[rows, rows + s]
                row_lse[s:e] = block.logsumexp(dim=1)
                row_right += (diag[s:e] >= block.amax(dim=1)).sum()
                new_max = torch.maximum(col_max, block.amax(dim=0))  # an online log-sum-exp per column
                col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(block - new_max).sum(dim=0)
                col_max = new_max
            col_lse = col_max + col_sum.log()
            loss = (row_lse.sum() + col_lse.sum() - 2 * diag.sum()) / (2 * n)
            accuracy = torch.stack([row_right / n, (diag >= col_max).to(xf.dtype).mean()])
        ctx.save_for_backward(x, y, t, row_lse, col_lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_accuracy: Tensor):
        x, y, t, row_lse, col_lse = ctx.saved_tensors
        with _no_autocast(x):
            xf, yf, tf = _wide(x, y, t)
            n = x.shape[0]

            def softmaxes(similarity: Tensor, s: int, e: int) -> Tensor:
                block = tf * similarity
                return (torch.exp(block - row_lse[s:e, None]) + torch.exp(block - col_lse[None, :])) / (2 * n)

            gx, gy, gt, _ = _block_gradients(xf, yf, tf, ctx.chunk, softmaxes)
            grad = grad_loss.to(xf.dtype)
        return (gx * grad).to(x.dtype), (gy * grad).to(y.dtype), (gt * grad).to(t.dtype).reshape(t.shape), None


class _ChunkedSigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, t: Tensor, b: Tensor, chunk: int):
        with _no_autocast(x):
            xf, yf, tf, bf = _wide(x, y, t, b)
            n = x.shape[0]
            total = torch.zeros((), device=x.device, dtype=xf.dtype)
            diag_sum = torch.zeros((), device=x.device, dtype=xf.dtype)
            logit_sum = torch.zeros((), device=x.device, dtype=xf.dtype)
            right = torch.zeros((), device=x.device, dtype=xf.dtype)
            for s, e in _blocks(n, chunk):
                block = (tf * xf[s:e]) @ yf.T + bf
                rows = torch.arange(e - s, device=x.device)
                diag = block[rows, rows + s]
                total += torch.nn.functional.softplus(block).sum() - diag.sum()
                diag_sum += diag.sum()
                logit_sum += block.sum()
                right += (block < 0).sum() - (diag < 0).sum() + (diag > 0).sum()
            pairs = n * n
            stats = torch.stack([diag_sum / n, (logit_sum - diag_sum) / max(1, pairs - n), right / pairs])
        ctx.save_for_backward(x, y, t, b)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(stats)
        return total / n, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        x, y, t, b = ctx.saved_tensors
        with _no_autocast(x):
            xf, yf, tf, bf = _wide(x, y, t, b)
            n = x.shape[0]
            gx, gy, gt, gb = _block_gradients(xf, yf, tf, ctx.chunk,
                                              lambda similarity, s, e: torch.sigmoid(tf * similarity + bf) / n)
            grad = grad_loss.to(xf.dtype)
        return ((gx * grad).to(x.dtype), (gy * grad).to(y.dtype), (gt * grad).to(t.dtype).reshape(t.shape),
                (gb * grad).to(b.dtype).reshape(b.shape), None)


def _check_chunk(image_embeds: Tensor, text_embeds: Tensor, chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"chunked losses need one caption per image: image embeddings {tuple(image_embeds.shape)}, "
                         f"text embeddings {tuple(text_embeds.shape)}")


def clip_loss_chunked(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """CLIP's loss of aligned pairs without the N x N logits in memory; -> (loss, [i2t_acc, t2i_acc])."""
    _check_chunk(image_embeds, text_embeds, chunk)
    return _ChunkedClip.apply(image_embeds, text_embeds, logit_scale, chunk)


def siglip_loss_recomputed(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                           chunk: int) -> tuple[Tensor, Tensor]:
    """SigLIP's loss without the N x N logits in memory; -> (loss, [pos_logit, neg_logit, pair_acc])."""
    _check_chunk(image_embeds, text_embeds, chunk)
    return _ChunkedSigLip.apply(image_embeds, text_embeds, logit_scale, logit_bias, chunk)
