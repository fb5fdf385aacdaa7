fn main() {
    println!("trainyard");
}
