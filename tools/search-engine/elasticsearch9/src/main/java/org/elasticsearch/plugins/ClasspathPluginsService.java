package org.elasticsearch.plugins;

import java.util.List;
import java.util.Map;
import java.util.Set;

import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;

/**
 * A plugins service whose plugins are classes on the classpath, not directories of jars:
 * the launcher runs the engine from Maven artifacts, so there is no modules/ or plugins/
 * folder to scan. It lives in Elasticsearch's package because {@link LoadedPlugin} is
 * package-private (the engine's own test framework does the same).
 */
public final class ClasspathPluginsService extends PluginsService {
    private final List<LoadedPlugin> classpathPlugins;

    public ClasspathPluginsService(
        Settings settings,
        Environment environment,
        PluginsLoader pluginsLoader,
        List<Class<? extends Plugin>> pluginClasses
    ) {
        super(settings, environment.configDir(), pluginsLoader);
        this.classpathPlugins = pluginClasses.stream().map(ClasspathPluginsService::load).toList();
    }

    /** A loader with no module or plugin bundles (there are no modules/ or plugins/ folders). */
    public static PluginsLoader emptyLoader() {
        return new PluginsLoader(Set.of(), Set.of(), Map.of());
    }

    private static LoadedPlugin load(Class<? extends Plugin> pluginClass) {
        return new LoadedPlugin(ClasspathPlugins.descriptor(pluginClass), ClasspathPlugins.instantiate(pluginClass), pluginClass.getClassLoader());
    }

    @Override
    protected List<LoadedPlugin> plugins() {
        return classpathPlugins;
    }
}
