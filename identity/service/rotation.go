package service

import (
	"bytes"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/tunmesh/tunmesh/identity/ca"
)

// Events emitted on the issuer Secret.
const (
	EventIssuerUpdated       = "IssuerUpdated"
	EventIssuerUpdateSkipped = "IssuerUpdateSkipped"
)

// watchIssuer returns an informer on the issuer Secret. Every change is
// loaded and verified against the trust anchors: a valid issuer replaces
// the current one without a restart (event IssuerUpdated), an invalid one
// is refused and the current issuer stays (Warning IssuerUpdateSkipped).
// Watch failures are logged, counted and re-established by the reflector.
func (s *Service) watchIssuer(ctx context.Context) (cache.SharedIndexInformer, error) {
	ns := s.ca.Config().ControlNamespace
	factory := informers.NewSharedInformerFactoryWithOptions(s.client, 0,
		informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.cfg.IssuerSecret).String()
		}))
	inf := factory.Core().V1().Secrets().Informer()
	if err := inf.SetWatchErrorHandlerWithContext(s.watchErrorHandler("secrets")); err != nil {
		return nil, fmt.Errorf("issuer watch error handler: %w", err)
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.issuerChanged(obj) },
		UpdateFunc: func(_, obj any) { s.issuerChanged(obj) },
	}); err != nil {
		return nil, fmt.Errorf("watch issuer secret: %w", err)
	}
	return inf, nil
}

func (s *Service) issuerChanged(obj any) {
	sec, ok := obj.(*corev1.Secret)
	if !ok {
		return
	}
	cur := s.ca.Issuer()
	certPEM, keyPEM := sec.Data[corev1.TLSCertKey], sec.Data[corev1.TLSPrivateKeyKey]
	if sameIssuer(cur, certPEM) {
		return // the issuer we already use (start-up, resync, unrelated edits)
	}
	iss, err := ca.ParseIssuer(certPEM, keyPEM, s.ca.Anchors(), s.now())
	if err != nil {
		s.metrics.issuerUpdates.WithLabelValues("skipped").Inc()
		s.log.Warn("issuer update skipped, keeping the current issuer", "secret", sec.Namespace+"/"+sec.Name, "err", err)
		s.recorder.Eventf(sec, corev1.EventTypeWarning, EventIssuerUpdateSkipped, "Skipped issuer update: %v", err)
		return
	}
	s.ca.SetIssuer(iss)
	s.metrics.observeIssuer(iss)
	s.metrics.issuerUpdates.WithLabelValues("updated").Inc()
	s.log.Info("issuer updated", "secret", sec.Namespace+"/"+sec.Name, "subject", iss.Certificate.Subject.String(), "not_after", iss.Certificate.NotAfter)
	s.recorder.Eventf(sec, corev1.EventTypeNormal, EventIssuerUpdated, "Updated issuer: %s, valid until %s", iss.Certificate.Subject.CommonName, iss.Certificate.NotAfter.UTC().Format("2006-01-02T15:04:05Z"))
}

// sameIssuer reports whether certPEM's first certificate is the issuer in use.
func sameIssuer(cur *ca.Issuer, certPEM []byte) bool {
	first, err := firstCertDER(certPEM)
	return err == nil && bytes.Equal(first, cur.Certificate.Raw)
}
