package org.elasticsearch.node;

import java.util.List;

import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.ClasspathPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsService;

/**
 * An Elasticsearch node whose plugins (here the Netty HTTP and transport layer) come from
 * the classpath. Node's constructor that takes a service provider is package-private, hence
 * this package.
 */
public final class ClasspathPluginsNode extends Node {
    public ClasspathPluginsNode(Environment environment, List<Class<? extends Plugin>> plugins) {
        super(NodeConstruction.prepareConstruction(environment, new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment env, Settings settings) {
                return new ClasspathPluginsService(settings, env, plugins);
            }
        }, true));
    }
}
