from wapar_jax._src.zoo import Example, get_example, list_examples
