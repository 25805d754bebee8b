package workload

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// ErrNotManaged is returned for an identity nobody acquired.
var ErrNotManaged = errors.New("identity not managed")

// ManagerConfig tunes refreshes; zero values take the defaults.
type ManagerConfig struct {
	// RefreshAt is the fraction of a leaf's lifetime after which it is
	// renewed (default 0.7).
	RefreshAt float64
	// MinBackoff and MaxBackoff bound the jittered retry delay after a
	// failed refresh (default 1s and 1m).
	MinBackoff, MaxBackoff time.Duration
}

// Manager holds one key and leaf per identity in use on the node.
// NewManager starts nothing; Run owns the refresh goroutines.
type Manager struct {
	cfg       ManagerConfig
	certifier Certifier
	roots     *x509.CertPool
	log       *slog.Logger
	now       func() time.Time

	refreshes *prometheus.CounterVec
	expiry    *prometheus.GaugeVec

	mu      sync.Mutex // guards the fields below
	ctx     context.Context
	entries map[spiffe.ID]*entry
	wg      sync.WaitGroup // refresh goroutines
}

// entry is one identity. cert and err are guarded by Manager.mu.
type entry struct {
	refs   int
	cert   *tls.Certificate
	err    error         // last refresh error, nil after a success
	ready  chan struct{} // closed at the first certificate
	cancel context.CancelFunc
}

// NewManager checks its dependencies and registers its metrics in reg.
func NewManager(cfg ManagerConfig, certifier Certifier, roots *x509.CertPool, reg prometheus.Registerer, log *slog.Logger) (*Manager, error) {
	switch {
	case certifier == nil:
		return nil, errors.New("certificate manager: nil certifier")
	case roots == nil:
		return nil, errors.New("certificate manager: nil trust anchors")
	case reg == nil || log == nil:
		return nil, errors.New("certificate manager: nil registerer or logger")
	}
	if cfg.RefreshAt <= 0 || cfg.RefreshAt >= 1 {
		cfg.RefreshAt = 0.7
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(time.Minute, cfg.MinBackoff)
	}
	m := &Manager{
		cfg: cfg, certifier: certifier, roots: roots, log: log, now: time.Now,
		entries: map[spiffe.ID]*entry{},
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tunmesh_workload_certificate_refreshes_total",
			Help: "Workload certificate requests by result (ok, error).",
		}, []string{"result"}),
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tunmesh_workload_certificate_expiry_timestamp_seconds",
			Help: "NotAfter of the certificate served for each identity.",
		}, []string{"identity"}),
	}
	for _, c := range []prometheus.Collector{m.refreshes, m.expiry} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register certificate manager metrics: %w", err)
		}
	}
	m.refreshes.WithLabelValues("ok")
	m.refreshes.WithLabelValues("error")
	return m, nil
}

// Run lets Acquire start refreshers and blocks until ctx ends; then it
// stops them all and drops every key.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	m.ctx = ctx
	for id, e := range m.entries { // acquired before Run
		m.startLocked(id, e)
	}
	m.mu.Unlock()
	<-ctx.Done()
	m.wg.Wait()
	m.mu.Lock()
	m.entries = map[spiffe.ID]*entry{}
	m.mu.Unlock()
	return nil
}

// Acquire marks id as used by one more pod; the first use starts fetching
// its certificate.
func (m *Manager) Acquire(id spiffe.ID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		e = &entry{ready: make(chan struct{})}
		m.entries[id] = e
		if m.ctx != nil {
			m.startLocked(id, e)
		}
	}
	e.refs++
}

// Release drops one use; the last one stops refreshing and forgets the key.
func (m *Manager) Release(id spiffe.ID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		return
	}
	if e.refs--; e.refs > 0 {
		return
	}
	if e.cancel != nil {
		e.cancel()
	}
	delete(m.entries, id)
	m.expiry.DeleteLabelValues(id.String())
}

func (m *Manager) startLocked(id spiffe.ID, e *entry) {
	ctx, cancel := context.WithCancel(m.ctx)
	e.cancel = cancel
	m.wg.Add(1)
	go func() { // RoutineRefresh: one per identity, ends on Release or Run's end
		defer m.wg.Done()
		m.refresh(ctx, id, e)
	}()
}

// refresh keeps e's certificate fresh: renew at RefreshAt of the lifetime;
// after a failure keep the old certificate and retry with jittered
// exponential backoff.
func (m *Manager) refresh(ctx context.Context, id spiffe.ID, e *entry) {
	backoff := m.cfg.MinBackoff
	for {
		cert, err := m.fetch(ctx, id)
		var wait time.Duration
		m.mu.Lock()
		if err == nil {
			if e.cert == nil {
				close(e.ready)
			}
			e.cert, e.err = cert, nil
			lt := cert.Leaf.NotAfter.Sub(cert.Leaf.NotBefore)
			wait = cert.Leaf.NotBefore.Add(time.Duration(float64(lt) * m.cfg.RefreshAt)).Sub(m.now())
			backoff = m.cfg.MinBackoff
		} else if ctx.Err() == nil {
			e.err = err
			wait = jitter(backoff)
			backoff = min(backoff*2, m.cfg.MaxBackoff)
		}
		m.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			m.refreshes.WithLabelValues("ok").Inc()
			m.expiry.WithLabelValues(id.String()).Set(float64(cert.Leaf.NotAfter.Unix()))
			m.log.Info("workload certificate renewed", "identity", id.String(), "not_after", cert.Leaf.NotAfter, "next_refresh", wait.Round(time.Second))
		} else {
			m.refreshes.WithLabelValues("error").Inc()
			m.log.Warn("workload certificate refresh failed, keeping the current one", "identity", id.String(), "retry_in", wait.Round(time.Millisecond), "err", err)
		}
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// jitter spreads d over [0.8d, 1.2d) so that agents do not retry in step.
func jitter(d time.Duration) time.Duration {
	n, err := rand.Int(rand.Reader, big.NewInt(int64(d)*4/10+1))
	if err != nil {
		return d
	}
	return d*8/10 + time.Duration(n.Int64())
}

// fetch makes a new key and CSR and asks the certifier for a leaf.
func (m *Manager) fetch(ctx context.Context, id spiffe.ID) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key for %s: %w", id, err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: nil}, key)
	if err != nil {
		return nil, fmt.Errorf("create csr for %s: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	chain, err := m.certifier.Certify(ctx, id, csr)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("parse leaf for %s: %w", id, err)
	}
	if err := m.verify(chain, id); err != nil {
		return nil, fmt.Errorf("issued certificate for %s: %w", id, err)
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&key.PublicKey) {
		return nil, fmt.Errorf("issued certificate for %s does not match the requested key", id)
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// Certificate returns id's current certificate, waiting for the first one.
func (m *Manager) Certificate(ctx context.Context, id spiffe.ID) (*tls.Certificate, error) {
	m.mu.Lock()
	e := m.entries[id]
	m.mu.Unlock()
	if e == nil {
		return nil, fmt.Errorf("%s: %w", id, ErrNotManaged)
	}
	select {
	case <-e.ready:
	case <-ctx.Done():
		m.mu.Lock()
		err := e.err
		m.mu.Unlock()
		return nil, fmt.Errorf("certificate for %s: %w (last error: %v)", id, ctx.Err(), err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return e.cert, nil
}

// Expiry returns the NotAfter of id's current certificate.
func (m *Manager) Expiry(id spiffe.ID) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[id]; e != nil && e.cert != nil {
		return e.cert.Leaf.NotAfter, true
	}
	return time.Time{}, false
}

// LastError returns the error of id's latest refresh, nil after a success.
func (m *Manager) LastError(id spiffe.ID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[id]; e != nil {
		return e.err
	}
	return fmt.Errorf("%s: %w", id, ErrNotManaged)
}

// Identities lists the identities in use.
func (m *Manager) Identities() []spiffe.ID {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]spiffe.ID, 0, len(m.entries))
	for id := range m.entries {
		ids = append(ids, id)
	}
	return ids
}
