// Command tunmesh-identity is tunmesh's certificate authority: it signs
// workload certificates for node agents (see package service).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/service"
)

type config struct {
	service    service.Config
	ca         ca.Config
	issuerDir  string
	kubeconfig string
	logLevel   string
}

func main() {
	var cfg config
	fs := flag.NewFlagSet("tunmesh-identity", flag.ExitOnError)
	fs.StringVar(&cfg.service.Addr, "addr", ":8443", "TLS API listen address")
	fs.StringVar(&cfg.service.MetricsAddr, "metrics-addr", ":9990", "plain HTTP address for /metrics, /ready, /live (empty disables)")
	fs.StringVar(&cfg.issuerDir, "issuer-dir", "/var/run/tunmesh/identity/issuer", "directory with the issuer Secret mounted (tls.crt, tls.key, ca.crt)")
	fs.StringVar(&cfg.ca.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fs.StringVar(&cfg.ca.ControlNamespace, "control-namespace", "tunmesh", "namespace of the control plane (issuer Secret, events)")
	fs.DurationVar(&cfg.ca.Lifetime, "lifetime", 24*time.Hour, "workload certificate lifetime")
	fs.DurationVar(&cfg.ca.ClockSkew, "clock-skew", 20*time.Second, "NotBefore backdating for clock skew")
	fs.StringVar(&cfg.service.AgentNamespace, "agent-namespace", "tunmesh", "namespace of the node agent's ServiceAccount")
	fs.StringVar(&cfg.service.AgentServiceAccount, "agent-service-account", "tunmesh-node", "the node agent's ServiceAccount")
	fs.StringVar(&cfg.service.IssuerSecret, "issuer-secret", "tunmesh-identity-issuer", "issuer Secret watched for rotation")
	fs.StringVar(&cfg.service.ServiceAccount, "service-account", "tunmesh-identity", "this service's own ServiceAccount (its serving identity)")
	fs.StringVar(&cfg.kubeconfig, "kubeconfig", "", "kubeconfig (empty: in-cluster)")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "debug, info, warn or error")
	_ = fs.Parse(os.Args[1:])

	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "tunmesh-identity: --log-level: %v\n", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, cfg, log)
	stop()
	if err != nil {
		log.Error("tunmesh-identity failed", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, log *slog.Logger) error {
	issuer, anchors, err := ca.LoadFiles(cfg.issuerDir, time.Now())
	if err != nil {
		return fmt.Errorf("load issuer: %w", err)
	}
	authority, err := ca.New(cfg.ca, issuer, anchors)
	if err != nil {
		return err
	}
	var rc *rest.Config
	if cfg.kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	rc.UserAgent = "tunmesh-identity"
	// Every request costs a TokenReview (cached 10 s per token): a node
	// boot renews many identities at once.
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	svc, err := service.New(cfg.service, client, authority, reg, log)
	if err != nil {
		return err
	}
	return svc.Run(ctx)
}
