"""`fedseg he-context` (FLARE HEBuilder contexts for the simulator) and `fedseg he-decrypt` (encrypted global model
-> plaintext state dict that `fedseg evaluate` / `fedseg predict` load)."""

import stat

import numpy as np
import pytest
import tenseal as ts
import torch
from nvflare.apis.dxo import MetaKey
from nvflare.lighter.impl.he import HEBuilder

from fedseg.cli import main
from fedseg.flare.he import (
    CLIENT_CONTEXT,
    CONTEXT_META,
    SERVER_CONTEXT,
    SHAPES_META,
    context_fingerprint,
    read_context,
    save_encrypted_model,
)
from fedseg.models import get_model
from fedseg.training import load_state


def _contexts(ws, *extra):
    assert main(["he-context", "--workspace", str(ws), *extra]) == 0
    return ws / "startup" / SERVER_CONTEXT, ws / "startup" / CLIENT_CONTEXT


def test_he_context_writes_hebuilder_contexts_and_the_simulator_command(tmp_path, capsys):
    server_file, client_file = _contexts(tmp_path / "ws")
    out = capsys.readouterr().out
    assert f"nvflare simulator jobs/fedgs_lits_he -w {tmp_path / 'ws'}" in out and "key id" in out
    server, client = read_context(server_file, role="server"), read_context(client_file, role="client")
    assert server.is_public() and client.is_private() and server.has_relin_keys()
    assert stat.S_IMODE(client_file.stat().st_mode) == 0o600
    builder = HEBuilder()  # FLARE's provisioning builder with its defaults
    builder.initialize(None, None)
    reference = ts.context_from(builder.get_serialized_context(is_client=True))
    assert context_fingerprint(client)["params"] == context_fingerprint(reference)["params"]
    assert context_fingerprint(server)["params"] == context_fingerprint(client)["params"]
    # the two files share one key: a site's ciphertext, added at the server, decrypts at a site
    a, b = ts.ckks_vector(client, [1.0, 2.0]), ts.ckks_vector(client, [0.5, 0.25])
    total = ts.ckks_vector_from(server, a.serialize()) + ts.ckks_vector_from(server, b.serialize())
    np.testing.assert_allclose(ts.ckks_vector_from(client, total.serialize()).decrypt(), [1.5, 2.25], atol=1e-6)


def test_he_context_refuses_to_overwrite_without_force_and_checks_parameters(tmp_path, capsys):
    _, client_file = _contexts(tmp_path / "ws")
    key = context_fingerprint(read_context(client_file))["key_id"]
    assert main(["he-context", "--workspace", str(tmp_path / "ws")]) == 2
    assert "already exist" in capsys.readouterr().err
    assert context_fingerprint(read_context(client_file))["key_id"] == key
    _contexts(tmp_path / "ws", "--force")
    assert context_fingerprint(read_context(client_file))["key_id"] != key
    assert main(["he-context", "--workspace", str(tmp_path / "bad"), "--poly-modulus-degree", "4096",
                 "--coeff-mod-bit-sizes", "60", "60", "60", "60"]) == 2
    assert "TenSEAL refused the parameters" in capsys.readouterr().err
    assert main(["he-context", "--workspace", str(tmp_path / "bad"), "--poly-modulus-degree", "5000"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "startup" / SERVER_CONTEXT).exists()
    _contexts(tmp_path / "big", "--poly-modulus-degree", "16384", "--coeff-mod-bit-sizes", "60", "40", "40", "60")


def _encrypted_utnet(client):
    """A small UTNet's state dict as the HE server stores it: float entries as flat CKKS ciphertexts."""
    torch.manual_seed(0)
    net = get_model("utnet", in_channels=1, num_classes=1, base_chan=4)
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    weights, keys = {}, {}
    for k, v in state.items():
        if np.issubdtype(v.dtype, np.floating):
            weights[k], keys[k] = ts.ckks_vector(client, v.ravel()), True
        else:
            weights[k] = v  # integer buffers stay plaintext (not in PROCESSED_KEYS, as in a real run)
    shapes = {k: list(v.shape) for k, v in state.items()}
    return state, weights, keys, shapes


def _check_decrypted(path, state):
    decrypted = torch.load(path, weights_only=True)  # exactly how `fedseg evaluate` reads --model
    net = get_model("utnet", in_channels=1, num_classes=1, base_chan=4)
    load_state(net, decrypted)
    for k, v in net.state_dict().items():
        assert tuple(v.shape) == state[k].shape
        np.testing.assert_allclose(v.numpy(), state[k], atol=1e-5)


def test_he_decrypt_gives_a_state_dict_that_loads_into_the_model(tmp_path, capsys):
    _, client_file = _contexts(tmp_path / "ws")
    client = read_context(client_file)
    state, weights, keys, shapes = _encrypted_utnet(client)
    meta = {MetaKey.PROCESSED_KEYS: keys, CONTEXT_META: context_fingerprint(read_context(client_file)),
            SHAPES_META: {}}
    enc = save_encrypted_model(tmp_path / "global_model_encrypted.pt", weights, meta, shapes)
    out = tmp_path / "global_model.pt"
    assert main(["he-decrypt", "--model", str(enc), "--context", str(client_file), "--out", str(out)]) == 0
    assert "decrypted" in capsys.readouterr().out
    _check_decrypted(out, state)
    assert main(["he-decrypt", "--model", str(enc), "--context", str(client_file), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # the persistor's checkpoint format (app_server/FL_global_model.pt of an HE run)
    ckpt = {"model": {k: (v.serialize() if isinstance(v, ts.CKKSVector) else torch.as_tensor(v))
                      for k, v in weights.items()},
            "meta_props": {MetaKey.PROCESSED_KEYS: keys, SHAPES_META: shapes}, "tensor_shapes": shapes}
    torch.save(ckpt, tmp_path / "FL_global_model.pt")
    out2 = tmp_path / "from_persistor.pt"
    assert main(["he-decrypt", "--model", str(tmp_path / "FL_global_model.pt"), "--context", str(client_file),
                 "--out", str(out2)]) == 0
    _check_decrypted(out2, state)


@pytest.mark.parametrize("which, message", [("other", "key id"), ("server", "holds no secret key"),
                                            ("missing", "does not exist")])
def test_he_decrypt_refuses_a_context_that_cannot_decrypt(which, message, tmp_path, capsys):
    server_file, client_file = _contexts(tmp_path / "ws")
    _, other_file = _contexts(tmp_path / "other")
    client = read_context(client_file)
    _, weights, keys, shapes = _encrypted_utnet(client)
    meta = {MetaKey.PROCESSED_KEYS: keys, CONTEXT_META: context_fingerprint(client)}
    enc = save_encrypted_model(tmp_path / "m.pt", weights, meta, shapes)
    capsys.readouterr()
    context = {"other": other_file, "server": server_file, "missing": tmp_path / "nope" / CLIENT_CONTEXT}[which]
    assert main(["he-decrypt", "--model", str(enc), "--context", str(context), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(context) in err
    assert not (tmp_path / "o.pt").exists()
