"""Fast resampling between an input image grid and the (coarse, world-aligned) model grid.

Why this exists: resampling at the input's full resolution dominated inference time (a 512×512×300
CT: σ = 1 mm smoothing of all 78 M voxels, then 5 probability channels interpolated back at all of
them, ≈ 6 s against 0.15 s of network). Both directions are made proportional to what they must
produce, with the semantics of the SimpleITK reference kept (:mod:`.preprocessing`):

* **In** (axis-aligned inputs): SimpleITK's recursive Gaussian followed by linear interpolation is a
  linear operator that factorises per axis. Its per-axis matrix (the Gaussian's exact impulse
  response, taken from SimpleITK itself, times the interpolation weights) is banded, so the volume is
  reduced axis by axis — each input voxel is read once, and nothing is smoothed that is not sampled.
  The first pass runs in cache-sized column tiles, in threads, and converts each input voxel to
  float32 there — through source matching's lookup when SM is on, so no matched copy of the scan is
  ever made (:meth:`Band.apply_first_axis`).
* **Out** (any input): the argmax of linearly interpolated probabilities is constant inside a model
  cell whose eight corners share one argmax (a convex combination keeps each pairwise inequality),
  so those cells are filled with a lookup and only the few mixed cells (organ boundaries) are
  interpolated, with the same arithmetic as before, in the channels that can win there (axis-aligned
  targets: :func:`_candidate_groups`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .image import Geometry

#: an input counts as axis-aligned when snapping its direction to ±identity moves no voxel centre by
#: more than this (header noise such as 1e-7 in direction cosines, never a real tilt)
SNAP_TOLERANCE_MM = 1e-3
#: impulse-response weights below this fraction are dropped (the recursive Gaussian never reaches 0)
WEIGHT_FLOOR = 1e-6
MIXED = 255


def axis_signs(geometry: Geometry, shape_kji: tuple[int, int, int]) -> np.ndarray | None:
    """Per-axis sign (+1/−1) when the image axes are the world axes up to sign (within
    :data:`SNAP_TOLERANCE_MM` over the whole image); None when rotated or permuted."""
    d = geometry.direction_matrix
    snapped = np.diag(np.sign(np.diag(d)))
    if np.any(np.diag(snapped) == 0):
        return None
    extent = (np.array([shape_kji[2], shape_kji[1], shape_kji[0]], float) - 1) * np.asarray(geometry.spacing)
    # the farthest voxel centre moves by at most Σ_a |d_a − snapped_a| · extent_a
    if float(np.max(np.abs(d - snapped) @ extent)) > SNAP_TOLERANCE_MM:
        return None
    return np.diag(snapped).copy()


def axis_positions(source: Geometry, source_shape_kji: tuple[int, int, int], target: Geometry,
                   target_shape_kji: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Continuous indices in ``source`` of the voxel centres of ``target``, per axis (x, y, z), when both
    grids are axis-aligned (see :func:`axis_signs`); None otherwise."""
    s_sign = axis_signs(source, source_shape_kji)
    t_sign = axis_signs(target, target_shape_kji)
    if s_sign is None or t_sign is None:
        return None
    sizes = (target_shape_kji[2], target_shape_kji[1], target_shape_kji[0])
    out = []
    for a in range(3):
        world = target.origin[a] + t_sign[a] * target.spacing[a] * np.arange(sizes[a])
        out.append((world - source.origin[a]) / (s_sign[a] * source.spacing[a]))
    return out


# ------------------------------------------------------------------------------------------- in


def gaussian_matrix(n: int, spacing: float, sigma_mm: float) -> np.ndarray:
    """(n × n) matrix of SimpleITK's recursive Gaussian along one axis of ``n`` voxels, borders
    included: column j is its response to an impulse at j (the filter is linear)."""
    if sigma_mm <= 0:
        return np.eye(n)
    impulses = sitk.GetImageFromArray(np.eye(n, dtype=np.float32))  # array[j, i] = δ(i == j)
    impulses.SetSpacing((float(spacing), 1.0))
    f = sitk.RecursiveGaussianImageFilter()
    f.SetSigma(float(sigma_mm))
    f.SetDirection(0)
    f.SetOrder(0)
    f.SetNormalizeAcrossScale(False)
    response = sitk.GetArrayFromImage(f.Execute(impulses)).astype(np.float64)  # [j, i] = G[i, j]
    return response.T


def linear_matrix(pos: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(pos) × n_in) linear-interpolation weights with SimpleITK's semantics (a point is inside
    when its continuous index is in [−0.5, n − 0.5); neighbours clamp at the border) and the
    inside mask; rows of outside points are zero."""
    i0 = np.floor(pos).astype(np.intp)
    w1 = pos - i0
    inside = (pos >= -0.5) & (pos < n_in - 0.5)
    m = np.zeros((len(pos), n_in))
    rows = np.nonzero(inside)[0]
    np.add.at(m, (rows, np.clip(i0[rows], 0, n_in - 1)), 1 - w1[rows])
    np.add.at(m, (rows, np.clip(i0[rows] + 1, 0, n_in - 1)), w1[rows])
    return m, inside


@dataclass(frozen=True)
class Band:
    """A banded (n_out × n_in) matrix: row m has weights ``weights[m]`` on inputs ``start[m] …``."""

    start: np.ndarray
    weights: torch.Tensor  # (n_out, width) float32

    @classmethod
    def from_dense(cls, m: np.ndarray) -> "Band":
        n_out, n_in = m.shape
        keep = np.abs(m) >= WEIGHT_FLOOR * np.maximum(np.abs(m).sum(1, keepdims=True), 1e-30)
        lo = np.where(keep.any(1), np.argmax(keep, 1), 0)
        hi = np.where(keep.any(1), n_in - 1 - np.argmax(keep[:, ::-1], 1), 0)
        width = int(max(1, (hi - lo + 1).max()))
        start = np.clip(lo, 0, max(0, n_in - width))
        idx = start[:, None] + np.arange(width)[None, :]
        w = np.where(np.take_along_axis(keep, np.minimum(idx, n_in - 1), 1),
                     np.take_along_axis(m, np.minimum(idx, n_in - 1), 1), 0.0)
        return cls(start, torch.from_numpy(w.astype(np.float32)))

    def groups(self, group: int) -> list[tuple[int, int, int, int, np.ndarray]]:
        """Outputs in groups of ``group``: (first, end, input start, input end, dense float32 block of the
        matrix over that input range) — one small matrix product per group."""
        width = self.weights.shape[1]
        n_out = len(self.start)
        weights = self.weights.numpy()
        spans = []
        for m0 in range(0, n_out, group):
            m1 = min(n_out, m0 + group)
            lo, hi = int(self.start[m0:m1].min()), int(self.start[m0:m1].max()) + width
            dense = np.zeros((m1 - m0, hi - lo), dtype=np.float32)
            for r, m in enumerate(range(m0, m1)):
                o = int(self.start[m]) - lo
                dense[r, o:o + width] = weights[m]
            spans.append((m0, m1, lo, hi, dense))
        return spans

    def apply(self, x: torch.Tensor, axis: int, group: int = 8) -> torch.Tensor:
        """Contract ``x`` (any dtype) along ``axis`` with this matrix → float32.

        Outputs go in groups of ``group``: each group's input range is converted to float once and
        reduced by one matrix product (BLAS, all threads) — a per-output loop converted every input
        slice several times and ran as many small products."""
        shape = list(x.shape)
        shape[axis] = len(self.start)
        out = torch.empty(shape, dtype=torch.float32)
        for m0, m1, lo, hi, dense_np in self.groups(group):
            dense = torch.from_numpy(dense_np)
            block = x.narrow(axis, lo, hi - lo).to(torch.float32)
            target = out.narrow(axis, m0, m1 - m0)
            if axis == 0:
                torch.matmul(dense, block.reshape(hi - lo, -1), out=target.view(m1 - m0, -1))
            elif axis == x.dim() - 2:
                target.copy_(torch.matmul(dense, block))  # batched over the leading axes
            elif axis == x.dim() - 1:
                target.copy_(torch.matmul(block, dense.T))
            else:
                target.copy_(torch.tensordot(dense, block, dims=([1], [axis])).movedim(0, axis))
        return out


    def apply_first_axis(self, array: np.ndarray, convert: "Convert | None" = None, group: int = 8,
                         tile: int = 2048) -> torch.Tensor:
        """:meth:`apply` along axis 0 of a C-contiguous numpy array, in column tiles, in threads.

        Each tile — every input slice, ``tile`` voxels wide (300 slices × 2048 float32 = 2.4 MB, in
        cache) — is converted to float32 once (``convert(values, out)``: e.g. source matching's
        lookup, :meth:`.matching.RawMapping.apply_into`; by default a cast) and reduced by the groups'
        small matrix products while it is still in cache. Why: converting per group re-read ≈ 1.5×
        the volume, and converting the whole volume first wrote a float copy twice the size of an
        int16 scan; reducing slices 1 MB wide ran from memory, not cache (a 512×512×300 CT: SM's
        lookup + this pass 0.18 s → 0.06 s on 2 cores)."""
        n_out, k = len(self.start), array.shape[0]
        cols = int(np.prod(array.shape[1:], dtype=np.int64))
        columns = array.reshape(k, cols)
        out = np.empty((n_out, cols), dtype=np.float32)
        spans = self.groups(group)

        def reduce_tile(t0: int) -> None:
            t1 = min(cols, t0 + tile)
            values = np.empty((k, t1 - t0), dtype=np.float32)
            if convert is None:
                values[...] = columns[:, t0:t1]
            else:
                convert(columns[:, t0:t1], values)
            reduced = np.empty((n_out, t1 - t0), dtype=np.float32)
            for m0, m1, lo, hi, dense in spans:
                np.matmul(dense, values[lo:hi], out=reduced[m0:m1])
            out[:, t0:t1] = reduced

        starts = range(0, cols, tile)
        workers = max(1, min(torch.get_num_threads(), len(starts)))
        if workers == 1:
            for t0 in starts:
                reduce_tile(t0)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(reduce_tile, starts))
        return torch.from_numpy(out.reshape((n_out,) + tuple(array.shape[1:])))


#: ``convert(values, out)``: write the float32 network-side values of an input slab into ``out``
Convert = Callable[[np.ndarray, np.ndarray], None]


def smooth_and_resample(array: np.ndarray, source: Geometry, grid_geometry: Geometry,
                        grid_shape_kji: tuple[int, int, int], sigma_mm: float,
                        default_value: float, convert: Convert | None = None) -> np.ndarray | None:
    """σ-mm Gaussian smoothing then linear resampling onto the grid, computed per axis for an
    axis-aligned input (float32, K,J,I); None when the input is rotated or too thin for the filter
    (the caller then uses SimpleITK on the full image). ``convert`` maps the input's values first
    (slab by slab, see :meth:`Band.apply_first_axis`)."""
    shape = array.shape
    if min(shape) < 4:  # SimpleITK's recursive Gaussian needs ≥ 4 voxels along each axis
        return None
    positions = axis_positions(source, shape, grid_geometry, grid_shape_kji)
    if positions is None:
        return None
    n_in = (shape[2], shape[1], shape[0])
    bands, inside = [], []
    for a in range(3):
        lin, ins = linear_matrix(positions[a], n_in[a])
        bands.append(Band.from_dense(lin @ gaussian_matrix(n_in[a], source.spacing[a], sigma_mm)))
        inside.append(ins)
    # z first: whole slices, contiguous, the largest reduction of memory
    x = bands[2].apply_first_axis(np.ascontiguousarray(array), convert)
    x = bands[1].apply(x, 1)
    x = bands[0].apply(x, 2)
    out = x.numpy()
    outside = ~(inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :])
    out[outside] = default_value
    return out


# ------------------------------------------------------------------------------------------ out


def _cell_labels(probs: np.ndarray) -> np.ndarray:
    """Per model cell (edge-padded, so cells −1 … n−1 per axis, shape n+1), the argmax shared by its
    eight corners, or :data:`MIXED`; one more plane per axis (index n+1) holds 0 for 'outside'."""
    lab = np.argmax(probs, axis=0).astype(np.uint8)
    p = np.pad(lab, 1, mode="edge")
    n = np.array(p.shape) - 1
    ref = p[:n[0], :n[1], :n[2]]
    cells = ref.copy()
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                cells[p[dz:dz + n[0], dy:dy + n[1], dx:dx + n[2]] != ref] = MIXED
    return np.pad(cells, ((0, 1), (0, 1), (0, 1)), constant_values=0)


def _axis_cells(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per target voxel along one axis: its cell (0 … n, n + 1 = outside), the two corner indices
    (clamped) and the upper weight, with the semantics of :func:`linear_matrix`."""
    raw = np.floor(pos).astype(np.intp)
    inside = (pos >= -0.5) & (pos < n - 0.5)
    cell = np.where(inside, raw + 1, n + 1)
    return cell, np.clip(raw, 0, n - 1), np.clip(raw + 1, 0, n - 1), (pos - raw).astype(np.float32)


def _take_last_axis(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array.take(index, axis=-1)`` over slabs of the first axis, in threads (the full-resolution
    output is the largest array of the step; numpy's take releases the GIL)."""
    out = np.empty(array.shape[:-1] + (len(index),), dtype=array.dtype)
    n = array.shape[0]
    workers = max(1, min(torch.get_num_threads(), n))
    if workers == 1:
        return np.take(array, index, axis=-1, out=out)
    bounds = np.linspace(0, n, workers + 1).astype(int)

    def part(i: int) -> None:
        np.take(array[bounds[i]:bounds[i + 1]], index, axis=-1, out=out[bounds[i]:bounds[i + 1]])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(part, range(workers)))
    return out


def _argmax_along_z(b: np.ndarray, wz: np.ndarray) -> np.ndarray:
    """Labels (N, bz, by, bx) of the last, z, interpolation step of a chunk of mixed cells.

    ``b``: (C, N, 2, by, bx) values already interpolated in x and y at the two z corners; ``wz``:
    (N, bz) upper weights. Channel by channel with a running maximum — the same float32 products
    and sum per channel as interpolating all channels at once, and the first maximal channel wins
    as in ``np.argmax`` — so the labels are identical, without the (C, N, bz, by, bx) array."""
    c, n, _, by, bx = b.shape
    bz = wz.shape[1]
    upper = np.ascontiguousarray(wz[:, :, None, None])
    lower = (1 - wz)[:, :, None, None]
    best = np.empty((n, bz, by, bx), dtype=np.float32)
    value = np.empty_like(best)
    tmp = np.empty_like(best)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for ch in range(c):
        target = best if ch == 0 else value
        np.multiply(b[ch, :, 0, None], lower, out=target)
        np.multiply(b[ch, :, 1, None], upper, out=tmp)
        target += tmp
        if ch:
            wins = value > best
            labels[wins] = ch
            np.maximum(best, value, out=best)
    return labels


def argmax_axis_aligned(probs: np.ndarray, positions: list[np.ndarray], target_shape_kji: tuple[int, int, int],
                        defaults: np.ndarray, chunk_cells: int = 512, check_cancel=lambda: None) -> np.ndarray:
    """Labels on an axis-aligned target grid (``positions``: model-grid indices of its voxel centres
    per axis x, y, z). Mixed cells are interpolated block by block — x, then y, then z, as the
    separable reference does — so their labels are the reference's to the last bit."""
    c, kg, jg, ig = probs.shape
    cells = _cell_labels(probs)
    ax = [_axis_cells(positions[0], ig), _axis_cells(positions[1], jg), _axis_cells(positions[2], kg)]
    labels = _take_last_axis(cells.take(ax[2][0], 0).take(ax[1][0], 1), ax[0][0])
    if int(np.argmax(defaults)) != 0:  # outside: the defaults' argmax (background in practice)
        outside = ((ax[2][0] > kg)[:, None, None] | (ax[1][0] > jg)[None, :, None] | (ax[0][0] > ig)[None, None, :])
        labels[outside] = int(np.argmax(defaults))
    mz, my, mx = np.nonzero(cells[:kg + 1, :jg + 1, :ig + 1] == MIXED)
    # target index ranges of each cell along each axis (positions are monotone: ranges are contiguous)
    ranges = []
    for (cell, i0, i1, w), n in zip(ax, (ig, jg, kg)):
        count = np.bincount(cell, minlength=n + 2)[:n + 1]
        first = np.full(n + 2, len(cell), dtype=np.intp)
        np.minimum.at(first, cell, np.arange(len(cell)))
        ranges.append((first[:n + 1], count, i0, i1, w))
    (fx, cx, x0, x1, wx), (fy, cy, y0, y1, wy), (fz, cz, z0, z1, wz) = ranges
    has = (cz[mz] > 0) & (cy[my] > 0) & (cx[mx] > 0)
    mz, my, mx = mz[has], my[has], mx[has]
    bz, by, bx = int(cz.max(initial=1)), int(cy.max(initial=1)), int(cx.max(initial=1))
    shape_j, shape_i = target_shape_kji[1], target_shape_kji[2]
    flat_labels = labels.reshape(-1)
    p = probs.astype(np.float32, copy=False)
    # the two corners of each cell along each axis are those of any of its voxels (the first one)
    fz0, fy0, fx0 = np.minimum(fz[mz], len(z0) - 1), np.minimum(fy[my], len(y0) - 1), np.minimum(fx[mx], len(x0) - 1)
    zc_all = np.stack([z0[fz0], z1[fz0]], 1)
    yc_all = np.stack([y0[fy0], y1[fy0]], 1)
    xc_all = np.stack([x0[fx0], x1[fx0]], 1)
    for channels, cells_of in _candidate_groups(p, zc_all, yc_all, xc_all):
        pc = p[channels] if len(channels) < c else p
        for s in range(0, len(cells_of), chunk_cells):
            check_cancel()
            q = cells_of[s:s + chunk_cells]
            qz, qy, qx = mz[q], my[q], mx[q]
            iz = fz[qz][:, None] + np.arange(bz)[None]  # (N, bz) target indices (clamped where padded)
            iy = fy[qy][:, None] + np.arange(by)[None]
            ix = fx[qx][:, None] + np.arange(bx)[None]
            vz, vy, vx = (np.arange(bz) < cz[qz][:, None], np.arange(by) < cy[qy][:, None],
                          np.arange(bx) < cx[qx][:, None])
            iz, iy, ix = np.minimum(iz, len(z0) - 1), np.minimum(iy, len(y0) - 1), np.minimum(ix, len(x0) - 1)
            zc, yc, xc = zc_all[q], yc_all[q], xc_all[q]
            corner = pc[:, zc[:, :, None, None], yc[:, None, :, None], xc[:, None, None, :]]  # (C', N, 2, 2, 2)
            wxn, wyn, wzn = wx[ix], wy[iy], wz[iz]
            a = (corner[..., 0, None] * (1 - wxn)[None, :, None, None, :]
                 + corner[..., 1, None] * wxn[None, :, None, None, :])
            b = (a[:, :, :, 0, None, :] * (1 - wyn)[None, :, None, :, None]
                 + a[:, :, :, 1, None, :] * wyn[None, :, None, :, None])  # (C', N, 2, by, bx)
            lab = channels[_argmax_along_z(b, wzn)]
            valid = vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :]
            flat = (iz[:, :, None, None] * shape_j + iy[:, None, :, None]) * shape_i + ix[:, None, None, :]
            flat_labels[flat[valid]] = lab[valid]
    return labels


#: slack for float32 rounding in the candidate bound of :func:`_candidate_groups` (probabilities)
_CANDIDATE_SLACK = 1e-5


def _candidate_groups(p: np.ndarray, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray):
    """Mixed cells grouped by the channels that can win somewhere inside them → (channels (uint8),
    cell indices) per group.

    Why it is exact: inside a cell every interpolated value of channel d is at least the smallest of
    its eight corners, so no point of the cell has a maximum below L = max_d min_corners p_d; a
    channel whose largest corner stays below L never wins there (with a slack for float32 rounding).
    At an organ boundary that leaves two channels of five, so the interpolation does 2/5 of the work."""
    c = p.shape[0]
    corner = p[:, zc[:, :, None, None], yc[:, None, :, None], xc[:, None, None, :]].reshape(c, len(zc), 8)
    floor = corner.min(axis=2).max(axis=0)
    candidate = corner.max(axis=2) >= floor[None] - _CANDIDATE_SLACK
    if c > 62:  # a signature per cell would overflow: every channel, every cell
        yield np.arange(c, dtype=np.uint8), np.arange(len(zc))
        return
    signature = (candidate.astype(np.int64) << np.arange(c, dtype=np.int64)[:, None]).sum(axis=0)
    order = np.argsort(signature, kind="stable")
    values, starts = np.unique(signature[order], return_index=True)
    bounds = list(starts) + [len(order)]
    for i, value in enumerate(values):
        channels = np.flatnonzero((int(value) >> np.arange(c)) & 1).astype(np.uint8)
        yield channels, order[bounds[i]:bounds[i + 1]]


def argmax_general(probs: np.ndarray, grid_geometry: Geometry, target: Geometry,
                   target_shape_kji: tuple[int, int, int], defaults: np.ndarray, slab: int = 8,
                   check_cancel=lambda: None) -> np.ndarray:
    """Labels on any target grid (rotated, permuted): per slab of target slices, the cell of each
    voxel from its continuous model-grid index; only voxels in mixed cells are interpolated."""
    c, kg, jg, ig = probs.shape
    n = np.array([ig, jg, kg])
    cells = _cell_labels(probs)
    flat_cells = cells.reshape(-1)
    pc = (kg + 2, jg + 2, ig + 2)
    # continuous model index of target voxel (i, j, k): A @ (i, j, k) + b (the model grid is world-aligned)
    a_mat = np.diag(1.0 / np.asarray(grid_geometry.spacing)) @ target.direction_matrix @ np.diag(target.spacing)
    b_vec = (np.asarray(target.origin) - np.asarray(grid_geometry.origin)) / np.asarray(grid_geometry.spacing)
    kt, jt, it = target_shape_kji
    jj, ii = np.arange(jt, dtype=float), np.arange(it, dtype=float)
    flat_probs = probs.reshape(c, -1).astype(np.float32, copy=False)
    outside_label = int(np.argmax(defaults))
    labels = np.empty(target_shape_kji, dtype=np.uint8)
    for k0 in range(0, kt, slab):
        check_cancel()
        kk = np.arange(k0, min(kt, k0 + slab), dtype=float)
        pos = [b_vec[a] + a_mat[a, 2] * kk[:, None, None] + a_mat[a, 1] * jj[None, :, None]
               + a_mat[a, 0] * ii[None, None, :] for a in range(3)]
        inside = np.ones(pos[0].shape, dtype=bool)
        raw = []
        for a in range(3):
            inside &= (pos[a] >= -0.5) & (pos[a] < n[a] - 0.5)
            raw.append(np.floor(pos[a]).astype(np.intp))
        cell = ((raw[2] + 1) * pc[1] + (raw[1] + 1)) * pc[2] + (raw[0] + 1)
        out = np.where(inside, flat_cells[np.where(inside, cell, 0)], outside_label).astype(np.uint8)
        mixed = out == MIXED
        if mixed.any():
            r = [x[mixed] for x in raw]
            w = [(pos[a][mixed] - r[a]).astype(np.float32) for a in range(3)]
            lo = [np.clip(r[a], 0, n[a] - 1) for a in range(3)]
            hi = [np.clip(r[a] + 1, 0, n[a] - 1) for a in range(3)]
            vals = np.zeros((c, len(r[0])), dtype=np.float32)
            for cz, wz in ((lo[2], 1 - w[2]), (hi[2], w[2])):
                for cy, wy in ((lo[1], 1 - w[1]), (hi[1], w[1])):
                    for cx, wx in ((lo[0], 1 - w[0]), (hi[0], w[0])):
                        vals += flat_probs[:, (cz * jg + cy) * ig + cx] * (wz * wy * wx)[None]
            out[mixed] = np.argmax(vals, axis=0)
        labels[k0:k0 + len(kk)] = out
    return labels
