// Debug aid: prints the token ids of a one-message chat.
use brise_kernels::quant::Kernels;
use brise_model::Model;
use brise_model::chat::Message;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m = Model::load(a[1].as_ref(), Kernels::best()).unwrap();
    let msgs = vec![Message::new("user", a[2].clone())];
    println!("{:?}", m.render_chat(&msgs, true).unwrap());
    println!("{:?}", m.encode_chat(&msgs, true).unwrap());
}
