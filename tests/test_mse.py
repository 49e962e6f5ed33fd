import torch

from pipeline.sae.mse import squared_error


def test_squared_error_matches_the_plain_expression_and_its_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x_hat = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mse, err = squared_error(x, x_hat)
    ref = (x - x_hat).pow(2).mean()
    torch.testing.assert_close(mse, ref)
    torch.testing.assert_close(err, (x - x_hat).detach())
    assert not err.requires_grad
    got = torch.autograd.grad(3 * mse, (x, x_hat))
    want = torch.autograd.grad(3 * ref, (x, x_hat))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: squared_error(a, b)[0], (x, x_hat))


def test_squared_error_gives_no_gradient_to_data():
    x = torch.randn(4, 3)
    x_hat = torch.randn(4, 3, requires_grad=True)
    mse, _ = squared_error(x, x_hat)
    mse.backward()
    torch.testing.assert_close(x_hat.grad, -2 * (x - x_hat.detach()) / x.numel())
