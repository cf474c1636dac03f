module eventtermq.example/e2e/amqp-client

go 1.22

require github.com/rabbitmq/amqp091-go v1.10.0
