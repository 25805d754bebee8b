// Package service is tunmesh-identity: it signs workload certificates for
// node agents. A request is honoured only when the caller's token is a
// valid projected token (audience tunmesh-identity) of the node agent's
// ServiceAccount bound to an agent pod on node N, and the requested
// identity ns/sa has a pod scheduled on N (node authorization: a
// compromised node can only mint identities present on it).
package service

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/rbac"
)

// Config configures the service.
type Config struct {
	// Addr is the TLS API address (default ":8443").
	Addr string
	// MetricsAddr serves /metrics, /ready and /live over plain HTTP; empty disables.
	MetricsAddr string
	// AgentNamespace and AgentServiceAccount name the node agent's
	// ServiceAccount, the only caller allowed (default tunmesh/tunmesh-node).
	AgentNamespace      string
	AgentServiceAccount string
	// IssuerSecret is the cert-manager style Secret (in the CA's control
	// namespace) watched for issuer rotation (default tunmesh-identity-issuer).
	IssuerSecret string
	// ServiceAccount is the service's own ServiceAccount name, the identity
	// in its serving certificate (default tunmesh-identity).
	ServiceAccount string
}

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = ":8443"
	}
	if c.AgentNamespace == "" {
		c.AgentNamespace = "tunmesh"
	}
	if c.AgentServiceAccount == "" {
		c.AgentServiceAccount = "tunmesh-node"
	}
	if c.IssuerSecret == "" {
		c.IssuerSecret = "tunmesh-identity-issuer"
	}
	if c.ServiceAccount == "" {
		c.ServiceAccount = "tunmesh-identity"
	}
}

// Service is the identity service. New starts nothing; Run serves until
// ctx ends.
type Service struct {
	cfg     Config
	client  kubernetes.Interface
	ca      *ca.CA
	log     *slog.Logger
	metrics *metrics
	now     func() time.Time

	tokens   *tokenCache
	pods     cache.Indexer // all pods, indexed by node/ns/sa
	synced   atomic.Bool
	recorder record.EventRecorder
	serving  *servingCert
	// ln, when set before Run, is used instead of listening on Addr.
	ln net.Listener
}

// New checks its dependencies and registers the metrics in reg.
func New(cfg Config, client kubernetes.Interface, authority *ca.CA, reg prometheus.Registerer, log *slog.Logger) (*Service, error) {
	switch {
	case client == nil:
		return nil, errors.New("identity service: nil client")
	case authority == nil:
		return nil, errors.New("identity service: nil CA")
	case reg == nil:
		return nil, errors.New("identity service: nil metrics registerer")
	case log == nil:
		return nil, errors.New("identity service: nil logger")
	}
	cfg.setDefaults()
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, client: client, ca: authority, log: log, metrics: m, now: time.Now, tokens: newTokenCache(10*time.Second, 4096)}
	s.serving = &servingCert{svc: s}
	m.observeIssuer(authority.Issuer())
	return s, nil
}

// Listener makes Run serve on ln (for tests and socket activation). Call
// before Run.
func (s *Service) Listener(ln net.Listener) { s.ln = ln }

// Run checks permissions, starts the informers, and serves until ctx ends.
func (s *Service) Run(ctx context.Context) error {
	if err := rbac.Check(ctx, s.client, RequiredPermissions(s.ca.Config().ControlNamespace, s.cfg.IssuerSecret)); err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: s.client.CoreV1().Events(s.ca.Config().ControlNamespace)})
	defer broadcaster.Shutdown()
	s.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tunmesh-identity"})

	factory := informers.NewSharedInformerFactory(s.client, 0)
	podInf := factory.Core().V1().Pods().Informer()
	if err := podInf.AddIndexers(cache.Indexers{byNodeIdentity: indexByNodeIdentity}); err != nil {
		return fmt.Errorf("index pods: %w", err)
	}
	if err := podInf.SetWatchErrorHandlerWithContext(s.watchErrorHandler("pods")); err != nil {
		return fmt.Errorf("pod watch error handler: %w", err)
	}
	s.pods = podInf.GetIndexer()
	issuerWatch, err := s.watchIssuer(ctx)
	if err != nil {
		return err
	}

	if s.ln == nil {
		if s.ln, err = net.Listen("tcp", s.cfg.Addr); err != nil {
			return fmt.Errorf("listen %s: %w", s.cfg.Addr, err)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+api.CertifyPath, s.limit(newClientLimiter(20, 100, 4096), http.HandlerFunc(s.handleCertify)))
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		// Bounded bodies (maxRequestBytes), headers, request time and idle
		// connections: a client cannot hold the service's memory or fds.
		ReadTimeout:    30 * time.Second,
		WriteTimeout:   30 * time.Second,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 16 << 10,
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS13,
			GetCertificate: s.serving.get,
		},
	}

	g, gctx := errgroup.WithContext(ctx)
	factory.Start(gctx.Done())
	g.Go(func() error {
		issuerWatch.Run(gctx.Done())
		return nil
	})
	g.Go(func() error {
		if !cache.WaitForCacheSync(gctx.Done(), podInf.HasSynced, issuerWatch.HasSynced) {
			return nil
		}
		s.synced.Store(true)
		s.log.Info("identity service ready", "addr", s.ln.Addr().String(), "trust_domain", s.ca.Config().TrustDomain)
		return nil
	})
	g.Go(func() error {
		err := srv.ServeTLS(s.ln, "", "")
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve api: %w", err)
	})
	if s.cfg.MetricsAddr != "" {
		msrv := &http.Server{Addr: s.cfg.MetricsAddr, Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error {
			err := msrv.ListenAndServe()
			if errors.Is(err, http.ErrServerClosed) {
				return nil
			}
			return fmt.Errorf("serve metrics: %w", err)
		})
		g.Go(func() error {
			<-gctx.Done()
			return msrv.Close()
		})
	}
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	err = g.Wait()
	factory.Shutdown()
	return err
}

// Addr is the API's listening address once Run has started serving.
func (s *Service) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Ready reports whether the informers have synced (requests are answered).
func (s *Service) Ready() bool { return s.synced.Load() }

func (s *Service) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if !s.Ready() {
			http.Error(w, "informers not synced", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// watchErrorHandler logs and counts watch failures; the reflector then
// re-lists and re-watches on its own, so a watch never silently stops.
func (s *Service) watchErrorHandler(resource string) cache.WatchErrorHandlerWithContext {
	return func(ctx context.Context, r *cache.Reflector, err error) {
		s.metrics.watchErrors.WithLabelValues(resource).Inc()
		s.log.Warn("watch failed, re-establishing", "resource", resource, "err", err)
		cache.DefaultWatchErrorHandler(ctx, r, err)
	}
}

// CA is the certificate authority the service signs with.
func (s *Service) CA() *ca.CA { return s.ca }
