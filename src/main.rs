fn main() {
    print!("{}", iot_operator::api::crd::all_crds_yaml().unwrap());
}
