//! f64 reference of [`crate::ops::multi_tensor_adamw`]: one AdamW update of one
//! tensor, as `torch.optim.AdamW` computes it.

use crate::ops::adamw::AdamWConsts;

/// The parameter, first and second moment after one update at step `step`
/// (≥ 1) with learning rate `lr` and weight decay `weight_decay`: each element
/// `g = grad·grad_scale; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
/// p = p·(1 − lr·wd) − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)`.
pub fn adamw_step(
    (param, grad, m, v): (&[f64], &[f64], &[f64], &[f64]),
    (lr, weight_decay, step): (f64, f64, u64),
    c: &AdamWConsts,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert!(
        grad.len() == param.len() && m.len() == param.len() && v.len() == param.len(),
        "parameter, gradient and moments must have one length"
    );
    let t = step as f64;
    let step_size = lr / (1.0 - c.beta1.powf(t));
    let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..param.len() {
        let g = grad[i] * c.grad_scale;
        let mi = c.beta1 * m[i] + (1.0 - c.beta1) * g;
        let vi = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;
        let p =
            param[i] * (1.0 - lr * weight_decay) - step_size * mi / (vi.sqrt() / bc2_sqrt + c.eps);
        out.0.push(p);
        out.1.push(mi);
        out.2.push(vi);
    }
    out
}
