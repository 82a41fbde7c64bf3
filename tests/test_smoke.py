import hmora_ds


def test_version():
    assert hmora_ds.__version__.count(".") == 2
