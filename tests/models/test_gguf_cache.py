"""Two processes converting one GGUF model into the shared cache take turns: one converts, the other
waits and reuses its folder (``models.loading.convert_gguf``)."""

from __future__ import annotations

import threading
import time

import oloraplus.models.loading as loading


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    calls = []

    def slow_convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one holds the lock
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    out = tmp_path / "models" / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.convert_gguf(tmp_path / "m.gguf", out)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [out, out]
    assert calls == [out]  # the second caller found the first one's folder
