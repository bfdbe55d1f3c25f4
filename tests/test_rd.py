"""RD points: CSV round trip, mean curves per setting, Bjontegaard deltas."""
import math

import numpy as np
import pytest

from utils import rd

CURVE = [(0.25, 27.0), (0.5, 30.0), (1.0, 33.5), (2.0, 37.0), (4.0, 41.5)]


def scaled(curve, rate=1.0, shift=0.0):
  return [(r * rate, q + shift) for r, q in curve]


def test_a_curve_against_itself_is_zero():
  assert rd.bd_rate(CURVE, CURVE) == pytest.approx(0.0, abs=1e-9)
  assert rd.bd_psnr(CURVE, CURVE) == pytest.approx(0.0, abs=1e-9)


def test_known_deltas():
  assert rd.bd_rate(CURVE, scaled(CURVE, rate=0.8)) == pytest.approx(-20.0)
  assert rd.bd_rate(CURVE, scaled(CURVE, rate=1.25)) == pytest.approx(25.0)
  assert rd.bd_psnr(CURVE, scaled(CURVE, shift=1.0)) == pytest.approx(1.0)
  # Order of the points does not matter; the anchor/test roles flip the sign of the log-rate gap.
  assert rd.bd_rate(CURVE[::-1], scaled(CURVE, rate=0.8)[::-1]) == pytest.approx(-20.0)
  assert rd.bd_rate(scaled(CURVE, rate=0.8), CURVE) == pytest.approx(25.0)


def test_only_the_common_range_counts():
  # Log-rate linear in PSNR, which PCHIP reproduces exactly from any subset of the points; the test
  # curve covers only the upper part of the anchor's range, at 10 % less rate.
  anchor = [(2 ** ((q - 33) / 3.5), q) for q in (27, 30, 33.5, 37, 41.5)]
  test = scaled(anchor[2:], rate=0.9)
  assert rd.bd_rate(anchor, test) == pytest.approx(-10.0)


def test_rows_are_averaged_per_setting():
  rows = []
  for image, offset in (("a.png", -1.0), ("b.png", 1.0)):
    for setting, (r, q) in zip((10, 20, 40, 60, 80), CURVE):
      rows.append(dict(codec="x", setting=setting, image=image, bpp=r * (1 + 0.1 * offset), psnr=q + offset,
                       ms_ssim=0.9))
  curve = rd.mean_curve(rows)
  assert [p["setting"] for p in curve] == [10, 20, 40, 60, 80]
  assert [p["images"] for p in curve] == [2] * 5
  assert np.allclose([(p["bpp"], p["psnr"]) for p in curve], CURVE)
  assert rd.bd_rate(rows, CURVE) == pytest.approx(0.0, abs=1e-9)
  assert rd.bd_rate(CURVE, rows, metric="psnr") == pytest.approx(0.0, abs=1e-9)


def test_unusable_curves_raise_value_error():
  with pytest.raises(ValueError, match="overlap"):
    rd.bd_rate(CURVE, scaled(CURVE, shift=20.0))
  with pytest.raises(ValueError, match="two points"):
    rd.bd_rate(CURVE, CURVE[:1])
  with pytest.raises(ValueError):
    rd.bd_rate(CURVE, [(1.0, 30.0), (2.0, 30.0)])
  # A dominated point (more bits for less quality) and lossless points (infinite PSNR) are left out.
  assert rd.bd_rate(CURVE, CURVE + [(3.0, 36.0)]) == pytest.approx(0.0, abs=1e-9)
  assert rd.bd_rate(CURVE + [(8.0, math.inf)], CURVE) == pytest.approx(0.0, abs=1e-9)


def test_points_round_trip_through_csv(tmp_path):
  rows = [dict(codec="jpeg", setting=50, image="a.png", bpp=0.5, psnr=31.25, ms_ssim=0.97),
          dict(codec="bls2017", setting=0.01, image="a.png", bpp=0.4, psnr=30.5, ms_ssim=0.96, est_bpp=0.39)]
  path = str(tmp_path / "sub" / "points.csv")
  rd.write_points(path, rows)
  back = rd.read_points(path)
  assert [r["codec"] for r in back] == ["jpeg", "bls2017"]
  assert back[0]["setting"] == "50" and math.isnan(back[0]["est_bpp"])
  assert back[1]["est_bpp"] == pytest.approx(0.39)
  assert np.allclose([r["bpp"] for r in back], [0.5, 0.4])


def test_bd_rate_of_ten_percent_fewer_bits_is_minus_ten():
  anchor = [(0.2, 28.0), (0.4, 31.0), (0.8, 34.5), (1.6, 38.0)]
  assert rd.bd_rate(anchor, anchor) == pytest.approx(0.0, abs=1e-9)
  cheaper = [(0.9 * bpp, psnr) for bpp, psnr in anchor]
  assert rd.bd_rate(anchor, cheaper) == pytest.approx(-10.0, abs=1e-6)


def test_rate_and_quality_at_a_point_of_another_curve():
  anchor = [(0.25, 28.0), (0.5, 31.0), (1.0, 34.0), (2.0, 37.0)]
  # On the anchor's own points, its own values.
  assert rd.rate_at_quality(anchor, 31.0) == pytest.approx(0.5)
  assert rd.quality_at_rate(anchor, 1.0) == pytest.approx(34.0)
  # Between points: log-rate is linear in quality here, so the middle is the geometric mean.
  assert rd.rate_at_quality(anchor, 32.5) == pytest.approx(math.sqrt(0.5 * 1.0), rel=1e-6)
  # Outside the curve: no extrapolation.
  assert math.isnan(rd.rate_at_quality(anchor, 40.0)) and math.isnan(rd.quality_at_rate(anchor, 0.1))
